; mb_kernel.asm -- a 32-bit Multiboot v1 kernel using the a.out kludge (flags bit 16).
;
; Built as ELF32 (mb_kernel.elf, for gdb) and as a flat binary (mb_kernel.bin), which a
; loader can only place through the header's address fields.  Loaded at physical 1 MiB;
; entered at mb_entry in 32-bit protected mode, paging off, eax = 0x2BADB002, ebx = mbi.
;
;   mb_entry   records boot_magic / boot_info, sets up a stack
;   check      if eax != 0x2BADB002: prints "bad magic\n", exits with value 0x11 (status 0x23)
;   good       prints "hello from multiboot\n"; if mbi flags bit 2: "cmdline: <cmdline>\n";
;              copies mem_lower/mem_upper (mbi flags bit 0) to mem_lower/mem_upper
;   mb_done    exits with value 0x10 (status 0x21)

%include "common.inc"

%define MB_MAGIC        0x1BADB002
%define MB_FLAGS        0x00010003              ; page-align, memory info, a.out kludge

extern _load_start, _load_end, _bss_end

section .multiboot progbits alloc exec nowrite align=4
bits 32
global mb_header:data 32
mb_header:
        dd MB_MAGIC
        dd MB_FLAGS
        dd -(MB_MAGIC + MB_FLAGS)
        dd mb_header                            ; header_addr
        dd _load_start                          ; load_addr
        dd _load_end                            ; load_end_addr
        dd _bss_end                             ; bss_end_addr
        dd mb_entry                             ; entry_addr

section .text progbits alloc exec nowrite align=16
global mb_entry:function
mb_entry:
        cli
        cld
        mov     [boot_magic], eax
        mov     [boot_info], ebx
        mov     esp, stack_top
        call    serial_init
global check:function
check:
        cmp     dword [boot_magic], MB_INFO_MAGIC
        je      good
        mov     esi, msg_bad
        call    serial_puts
        GUEST_EXIT 0x11
global good:function
good:
        mov     esi, msg_hello
        call    serial_puts
        mov     ebx, [boot_info]
        test    dword [ebx], 1 << 2             ; cmdline valid
        jz      .no_cmdline
        mov     esi, msg_cmdline
        call    serial_puts
        mov     esi, [ebx + 16]
        call    serial_puts
        mov     esi, msg_newline
        call    serial_puts
.no_cmdline:
        test    dword [ebx], 1 << 0             ; mem_lower / mem_upper valid
        jz      mb_done
        mov     eax, [ebx + 4]
        mov     [mem_lower], eax
        mov     eax, [ebx + 8]
        mov     [mem_upper], eax
global mb_done:function
mb_done:
        GUEST_EXIT EXIT_OK

DEFINE_SERIAL esi

section .rodata progbits alloc noexec nowrite align=4
msg_hello:      db "hello from multiboot", 10, 0
msg_bad:        db "bad magic", 10, 0
msg_cmdline:    db "cmdline: ", 0
msg_newline:    db 10, 0

section .data progbits alloc noexec write align=4096
global boot_magic:data 4
boot_magic:     dd 0
global boot_info:data 4
boot_info:      dd 0
global mem_lower:data 4
mem_lower:      dd 0
global mem_upper:data 4
mem_upper:      dd 0

section .bss nobits alloc noexec write align=4096
alignb 16
                resb 8192
stack_top:
