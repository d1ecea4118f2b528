; mode_switch.asm -- PVH guest that runs 32-bit code, then switches to 64-bit long mode.
;
; Linked entirely at physical 1 MiB (VMA == LMA, low.ld), so every label is also its
; physical address and gdb can break in either mode.  Entered at pvh_start32 in 32-bit
; protected mode (paging off, ebx = hvm_start_info).
;
;   pvh_start32   saves ebx in boot_info, loads the GDT, far-jumps to start32
;   start32       32-bit: segments, stack
;   loop32        adds 10 + 9 + ... + 1 into eax while count32 counts to 10
;   work32_done   sum32 = 55
;   enter_long    builds page tables (low 1 GiB identity, 2 MiB pages), PAE, LME, PG,
;                 far jump to start64
;   start64       64-bit: value64 = 0x1122334455667788
;   loop64        count64 counts to 10
;   work64_done   prints "mode switch ok\n" on COM1 and exits with value 0x10 (status 0x21)

%include "common.inc"

%define SEL_CODE64      0x08
%define SEL_DATA        0x10
%define SEL_CODE32      0x18

section .text progbits alloc exec nowrite align=16
bits 32

global pvh_start32:function
pvh_start32:
        cli
        cld
        mov     [boot_info], ebx
        lgdt    [gdt_ptr]
        jmp     SEL_CODE32:start32

global start32:function
start32:
        mov     ax, SEL_DATA
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     esp, stack_top
        xor     eax, eax
        mov     ecx, 10
global loop32:function
loop32:
        inc     dword [count32]
        add     eax, ecx
        dec     ecx
        jnz     loop32
global work32_done:function
work32_done:
        mov     [sum32], eax

global enter_long:function
enter_long:
        mov     edi, pml4
        xor     eax, eax
        mov     ecx, 3 * 4096 / 4
        rep stosd
        mov     dword [pml4], pdpt + 3
        mov     dword [pdpt], pd + 3
        mov     edi, pd
        mov     eax, 0x83                       ; present, writable, 2 MiB
        mov     ecx, 512
.fill:
        mov     [edi], eax
        add     eax, 0x200000
        add     edi, 8
        dec     ecx
        jnz     .fill
        mov     eax, cr4
        or      eax, 1 << 5                     ; PAE
        mov     cr4, eax
        mov     eax, pml4
        mov     cr3, eax
        mov     ecx, 0xC0000080                 ; EFER
        rdmsr
        or      eax, 1 << 8                     ; LME
        wrmsr
        mov     eax, cr0
        or      eax, (1 << 31) | 1              ; PG | PE
        mov     cr0, eax
        jmp     SEL_CODE64:start64

bits 64
global start64:function
start64:
        mov     ax, SEL_DATA
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     rsp, stack_top
        mov     rax, 0x1122334455667788
        mov     [rel value64], rax
        mov     ecx, 10
global loop64:function
loop64:
        inc     qword [rel count64]
        dec     ecx
        jnz     loop64
global work64_done:function
work64_done:
        call    serial_init
        lea     rsi, [rel msg_ok]
        call    serial_puts
        GUEST_EXIT EXIT_OK

DEFINE_SERIAL rsi

section .note.Xen note alloc noexec nowrite align=4
        dd 4, 8, 18                             ; namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
        db "Xen", 0
        dq pvh_start32

section .rodata progbits alloc noexec nowrite align=16
align 16
gdt:
        dq 0
        dq 0x00af9a000000ffff                   ; 0x08 64-bit code
        dq 0x00cf92000000ffff                   ; 0x10 flat data
        dq 0x00cf9a000000ffff                   ; 0x18 flat 32-bit code
gdt_end:
gdt_ptr:
        dw gdt_end - gdt - 1
        dd gdt
msg_ok:         db "mode switch ok", 10, 0

section .data progbits alloc noexec write align=4096
global boot_info:data 4
boot_info:      dd 0
global count32:data 4
count32:        dd 0
global sum32:data 4
sum32:          dd 0
align 8
global count64:data 8
count64:        dq 0
global value64:data 8
value64:        dq 0

section .bss nobits alloc noexec write align=4096
alignb 4096
pml4:           resb 4096
pdpt:           resb 4096
pd:             resb 4096
                resb 8192
stack_top:
