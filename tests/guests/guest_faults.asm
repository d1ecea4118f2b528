; guest_faults.asm -- a guest that breaks itself, for tests/test_guest_faults.py (issue 13).
;
; A Multiboot v1 kernel (a.out kludge: flat binary at 1 MiB, entered in 32-bit protected mode,
; paging off). The test assembles it once per case with `%define CASE n` in front
; (tests/guestbuild.assemble_flat). Every case loads its own GDT and a valid IDT whose 256
; interrupt gates lead to `handler`, then breaks something:
;
;   CASE 1  gp storm: the #GP handler counts and faults again (mov ds with a selector beyond
;           the GDT), forever; it never returns.
;   CASE 2  pf storm: long mode (4 KiB pages, 0-2 MiB identity); code on its own page unmaps
;           that page and reloads CR3; the #PF handler counts and IRETQs to the faulting
;           instruction, which faults again, forever.
;   CASE 3  wiped page tables: long mode, then the PML4 is zeroed and CR3 reloaded: the next
;           fetch faults, the IDT is unmapped too: double fault, triple fault.
;   CASE 4  garbage IDT: the IDT is overwritten with 0xa5 bytes (task gates to a selector
;           beyond the GDT), then ud2: triple fault.
;   CASE 5  a handler that cannot be reached: every gate names a not-present code segment;
;           ud2 -> #NP -> #DF -> triple fault.
;   CASE 6  cli; hlt (forever).
;   CASE 7  cli; an endless loop counting in [COUNTER].
;
; [COUNTER] (0x80000) counts handler entries (cases 1, 2) or loop turns (case 7); [READY]
; (0x80004) is 1 once the case's set-up is done. Both stay mapped in every case but 3.

%define COUNTER         0x80000
%define READY           0x80004
%define STACK_TOP       0x90000
%define IDT_ADDR        0x81000
%define PT_ADDR         0x84000
%define PML4_ADDR       0x85000
%define PDPT_ADDR       0x86000
%define PD_ADDR         0x87000
%if CASE == 2 || CASE == 3
%define LONG 1
%else
%define LONG 0
%endif

mb_header:
        dd 0x1BADB002
        dd 0x00010000
        dd -(0x1BADB002 + 0x00010000)
        dd mb_header
        dd 0x100000
        dd 0
        dd 0
        dd start

start:
        cli
        lgdt    [gdt_ptr]
        jmp     0x08:reload
reload:
        mov     ax, 0x10
        mov     ds, ax
        mov     es, ax
        mov     fs, ax
        mov     gs, ax
        mov     ss, ax
        mov     esp, STACK_TOP
        mov     dword [COUNTER], 0
        mov     dword [READY], 0
        mov     edi, IDT_ADDR
        mov     ecx, 256
.gate:  mov     eax, handler
        mov     [edi], ax
%if CASE == 5
        mov     word [edi + 2], 0x18            ; a code segment that is not present
%else
        mov     word [edi + 2], 0x08
%endif
        mov     word [edi + 4], 0x8e00          ; present, DPL 0, 32-bit interrupt gate
        shr     eax, 16
        mov     [edi + 6], ax
        add     edi, 8
        dec     ecx
        jnz     .gate
        lidt    [idt_ptr]
%if LONG
        ; 4-level paging, 0-2 MiB identity in 4 KiB pages (this host's KVM has no 32-bit
        ; paging without long mode); then long mode and a 64-bit IDT
        mov     edi, PT_ADDR
        xor     eax, eax
        mov     ecx, 4 * 1024
        rep stosd
        mov     edi, PT_ADDR
        mov     eax, 0x3                        ; present, writable
        mov     ecx, 512
.pte:   mov     [edi], eax
        add     eax, 0x1000
        add     edi, 8
        dec     ecx
        jnz     .pte
        mov     dword [PML4_ADDR], PDPT_ADDR + 3
        mov     dword [PDPT_ADDR], PD_ADDR + 3
        mov     dword [PD_ADDR], PT_ADDR + 3
        mov     eax, cr4
        or      eax, 1 << 5                     ; PAE
        mov     cr4, eax
        mov     eax, PML4_ADDR
        mov     cr3, eax
        mov     ecx, 0xC0000080
        rdmsr
        or      eax, 1 << 8                     ; EFER.LME
        wrmsr
        mov     eax, cr0
        or      eax, 0x80000000
        mov     cr0, eax
        jmp     0x20:long_entry
bits 64
long_entry:
        mov     edi, IDT_ADDR
        mov     ecx, 256
.gate64:
        mov     eax, handler
        mov     [rdi], ax
        mov     word [rdi + 2], 0x20
        mov     word [rdi + 4], 0x8e00          ; present, DPL 0, 64-bit interrupt gate
        shr     eax, 16
        mov     [rdi + 6], ax
        mov     qword [rdi + 8], 0
        add     edi, 16
        dec     ecx
        jnz     .gate64
        lidt    [idt64_ptr]
%endif
        mov     dword [READY], 1
        jmp     case

%if CASE == 2
align 4096
case:                                           ; this page unmaps itself
        mov     dword [PT_ADDR + (((case - $$) + 0x100000) >> 12) * 8], 0
        mov     rax, cr3
        mov     cr3, rax
        nop                                     ; never fetched: #PF, over and over
        jmp     case
align 4096
%else
case:
%endif
%if CASE == 1
        mov     ax, 0x7ff8                      ; beyond the GDT: #GP
        mov     ds, ax
%elif CASE == 3
        mov     edi, PML4_ADDR
        xor     eax, eax
        mov     ecx, 1024
        rep stosd
        mov     rax, cr3
        mov     cr3, rax
        nop
%elif CASE == 4
        mov     edi, IDT_ADDR
        mov     eax, 0xa5a5a5a5
        mov     ecx, 512
        rep stosd
        ud2
%elif CASE == 5
        ud2
%elif CASE == 6
        cli
.h:     hlt
        jmp     .h
%elif CASE == 7
        cli
.spin:  inc     dword [COUNTER]
        jmp     .spin
%endif
        jmp     $

handler:
        inc     dword [COUNTER]
%if CASE == 1
        mov     esp, STACK_TOP                  ; the storm never grows the stack
        mov     ax, 0x7ff8
        mov     ds, ax                          ; #GP again
%elif CASE == 2
        add     rsp, 8                          ; the error code
        iretq                                   ; back to the unmapped page: #PF again
%endif
        mov     al, 0x7e                        ; any other exception: exit 0xfd
        out     0xf4, al
        jmp     $

bits 32
align 8
gdt:
        dq 0
        dq 0x00cf9a000000ffff                   ; 0x08 flat 32-bit code
        dq 0x00cf92000000ffff                   ; 0x10 flat data
        dq 0x00cf1a000000ffff                   ; 0x18 32-bit code, not present
        dq 0x00af9a000000ffff                   ; 0x20 64-bit code
gdt_end:
gdt_ptr:
        dw gdt_end - gdt - 1
        dd gdt
idt_ptr:
        dw 256 * 8 - 1
        dd IDT_ADDR
idt64_ptr:
        dw 256 * 16 - 1
        dq IDT_ADDR
