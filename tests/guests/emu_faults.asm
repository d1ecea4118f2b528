; emu_faults.asm -- exceptions a long-mode kernel takes through its IDT (64-bit, at 0x1000).
;
; Built by tests/test_emu_faults.py with guestbuild.assemble_flat (bits 64, org 0x1000). The
; vCPU starts at CPL0 in long mode as tests/hvguest.setup_long_mode leaves it (flat GDT: 0x18
; code, 0x10 data; identity paging of the first 2 MiB: PML4 0x10000, PD 0x12000). RDI picks
; the scenario; every OUT is a checkpoint at which the test reads registers:
;
;   rdi = 0  #PFs in a row, each reported by the handler (0x63: rax = CR2, rbx = error code)
;            and fixed by mapping the page (PT2, for 2..4 MiB, at 0x14000, onto 0x30000 + n
;            pages) or by making it writable; then 0x60: rax, rbx, rcx = what the three reads
;            of mapped pages returned. Then a #GP (non-canonical load): 0x61 with rbx = error
;            code, rcx = the faulting RIP; the handler skips the load. Then the #PF gate is
;            marked not present and a #PF becomes #DF: 0x62 with rbx = error code, rcx = RIP.
;   rdi = 1  IRETQ to a non-canonical RIP: #GP at the IRETQ (0x61), at CPL0
;   rdi = 2  SYSRETQ with a non-canonical RCX: #GP at the SYSRETQ (0x61), at CPL0
;   rdi = 3  sti; hlt; the test injects vector 0x20 while halted: 0x64 from its handler,
;            then 0x65 after the hlt

%define PD              0x12000
%define PT2             0x14000
%define DATA_PAGE       0x30000

kernel:
        mov     r15, rdi
        mov     rax, cr0
        or      rax, 1 << 16            ; WP: supervisor writes honour read-only pages
        mov     cr0, rax
        mov     rdi, 14
        mov     rsi, pf_handler
        call    set_gate
        mov     rdi, 13
        mov     rsi, gp_handler
        call    set_gate
        mov     rdi, 8
        mov     rsi, df_handler
        call    set_gate
        mov     rdi, 0x20
        mov     rsi, irq_handler
        call    set_gate
        lidt    [idtr]
        cmp     r15, 1
        je      iret_noncanonical
        cmp     r15, 2
        je      sysret_noncanonical
        cmp     r15, 3
        je      halt_for_irq
        ; --- several #PFs in a row
        mov     qword [PD + 8], PT2 | 3 ; 2..4 MiB: a page table with nothing present
        mov     eax, [0x200000]         ; not present, read
        mov     ebx, eax
        mov     [0x201000], ebx         ; not present, write
        mov     ecx, [0x202000]         ; not present, read
        mov     qword [PT2 + 3 * 8], (DATA_PAGE + 3 * 0x1000) | 1  ; present, read-only
        mov     edx, [0x203000]         ; reads fine
        mov     [0x203000], edx         ; present, write: the handler makes it writable
        mov     ebx, [0x201000]
        out     0x60, al
        ; --- #GP through the IDT
        mov     rbx, 0x8000000000000000
gp_insn:
        mov     rax, [rbx]              ; non-canonical: #GP(0), 3 bytes skipped by the handler
        ; --- #DF when the #PF handler is not present
        and     byte [idt + 14 * 16 + 5], 0x7F
df_insn:
        mov     eax, [0x600000]
        jmp     $

iret_noncanonical:
        mov     rax, rsp
        push    0x10
        push    rax
        pushfq
        push    0x18
        mov     rax, 0x0000800000000000
        push    rax
iret_insn:
        iretq

sysret_noncanonical:
        mov     ecx, 0xC0000080
        rdmsr
        or      eax, 1                  ; SCE
        wrmsr
        mov     ecx, 0xC0000081
        xor     eax, eax
        mov     edx, 0x00230010
        wrmsr
        mov     rcx, 0x0000800000000000
        mov     r11, 2
sysret_insn:
        o64 sysret

halt_for_irq:
        sti
        hlt
        out     0x65, al
        jmp     $

; rdi = vector, rsi = handler: a present DPL0 interrupt gate
set_gate:
        shl     rdi, 4
        add     rdi, idt
        mov     word [rdi], si
        mov     word [rdi + 2], 0x18
        mov     word [rdi + 4], 0x8E00
        shr     rsi, 16
        mov     word [rdi + 6], si
        shr     rsi, 16
        mov     dword [rdi + 8], esi
        mov     dword [rdi + 12], 0
        ret

pf_handler:
        push    rax
        push    rbx
        push    rcx
        mov     rax, cr2
        mov     rbx, [rsp + 24]         ; the error code
        out     0x63, al
        mov     rcx, rax
        shr     rcx, 12
        and     ecx, 511
        test    ebx, 1
        jnz     .writable
        mov     rbx, rcx
        shl     rbx, 12
        add     rbx, DATA_PAGE | 3
        mov     [PT2 + rcx * 8], rbx
        jmp     .done
.writable:
        or      qword [PT2 + rcx * 8], 2
.done:
        invlpg  [rax]
        pop     rcx
        pop     rbx
        pop     rax
        add     rsp, 8
        iretq

gp_handler:
        mov     rbx, [rsp]
        mov     rcx, [rsp + 8]
        mov     r8, [rsp + 16]
        out     0x61, al
        add     rsp, 8
        add     qword [rsp], 3
        iretq

df_handler:
        mov     rbx, [rsp]
        mov     rcx, [rsp + 8]
        out     0x62, al
        jmp     $

irq_handler:
        out     0x64, al
        iretq

align 8
idtr:   dw      256 * 16 - 1
        dq      idt
align 16
idt:    times 256 * 16 db 0
