; elf64_kernel.asm -- a plain ELF64 kernel: no PVH note, no Multiboot header.
;
; gdbstub's loader enters it at _start in 64-bit long mode with the low 4 GiB identity-mapped
; and 0-2 GiB aliased at 0xffffffff80000000, where this kernel is linked (elf64.ld: loaded
; at physical 1 MiB).  It records the entry rsp/rdi/cr3 (entry_rsp, entry_rdi, entry_cr3),
; prints "hello from elf64\n" on COM1, then, if rdi points at an hvm_start_info (magic
; 0x336ec578), prints "cmdline: <command line>\n", and exits with value 0x10 (status 0x21).
; Labels: _start, after_hello, elf64_done.

%include "common.inc"

section .text progbits alloc exec nowrite align=16
bits 64

global _start:function
_start:
        mov     [rel entry_rsp], rsp
        mov     [rel entry_rdi], rdi
        mov     rax, cr3
        mov     [rel entry_cr3], rax
        lea     rsp, [rel stack_top]
        mov     rbx, rdi
        call    serial_init
        lea     rsi, [rel msg_hello]
        call    serial_puts
global after_hello:function
after_hello:
        test    rbx, rbx
        jz      elf64_done
        cmp     dword [rbx], PVH_MAGIC
        jne     elf64_done
        lea     rsi, [rel msg_cmdline]
        call    serial_puts
        mov     rsi, [rbx + 24]                 ; cmdline_paddr (identity-mapped)
        test    rsi, rsi
        jz      .newline
        call    serial_puts
.newline:
        lea     rsi, [rel msg_newline]
        call    serial_puts
global elf64_done:function
elf64_done:
        GUEST_EXIT EXIT_OK

DEFINE_SERIAL rsi

section .rodata progbits alloc noexec nowrite align=16
msg_hello:      db "hello from elf64", 10, 0
msg_cmdline:    db "cmdline: ", 0
msg_newline:    db 10, 0

section .data progbits alloc noexec write align=4096
global entry_rsp:data 8
entry_rsp:      dq 0
global entry_rdi:data 8
entry_rdi:      dq 0
global entry_cr3:data 8
entry_cr3:      dq 0

section .bss nobits alloc noexec write align=4096
alignb 16
                resb 8192
stack_top:
