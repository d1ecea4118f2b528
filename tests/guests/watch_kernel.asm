; watch_kernel.asm -- accesses for the watchpoint tests (tests/test_watchpoints.py).
;
; A plain ELF64 kernel (elf64.ld), entered at _start in 64-bit long mode. Each block below is
; a labelled run of accesses to one watched variable; the test breaks at a block's label, sets
; a watchpoint and checks every stop (address, old and new value, RIP just after the access).
;
;   lone          a qword alone in its page (.data)
;   nearv         a qword in the same page as the code that reads and writes it (.text.near)
;   sbyte / dbyte bytes for the string instructions, in the page of the code as well
;
; Each access is followed by a label (after_*) where the stop is expected (trap-after).
; At the end the guest exits with EXIT_OK (status 0x21).

%include "common.inc"

section .text progbits alloc exec nowrite align=16
bits 64

global _start:function
_start:
        lea     rsp, [rel stack_top]

; --- data alone in its page ------------------------------------------------------------
global lone_block:function
lone_block:
        mov     qword [rel lone], 0x11          ; write 0 -> 0x11
global after_lone_write:function
after_lone_write:
        mov     ecx, 2
lone_reads_top:
        mov     rax, [rel lone]                 ; read (twice, in a loop)
global after_lone_read:function
after_lone_read:
        add     rbx, rax
        dec     ecx
        jnz     lone_reads_top
        inc     qword [rel lone]                ; read-modify-write 0x11 -> 0x12
global after_lone_inc:function
after_lone_inc:
        jmp     near_block

section .text.near progbits alloc exec write align=4096
; --- data next to code (one page) ------------------------------------------------------
global near_block:function
near_block:
        mov     qword [rel nearv], 0x21          ; write 0 -> 0x21
global after_near_write:function
after_near_write:
        mov     ecx, 2
near_reads_top:
        mov     rax, [rel nearv]                 ; read (twice, in a loop)
global after_near_read:function
after_near_read:
        add     rbx, rax
        dec     ecx
        jnz     near_reads_top
        inc     qword [rel nearv]                ; read-modify-write 0x21 -> 0x22
global after_near_inc:function
after_near_inc:

; --- string instructions over a watched byte (sbyte, dbyte next to this code) ----------
global string_block:function
string_block:
        cld
        lea     rsi, [rel sbyte]
        lodsb                                   ; read sbyte (0x5a)
global after_lodsb:function
after_lodsb:
        lea     rdi, [rel dbyte]
        mov     al, 0x61
        stosb                                   ; write dbyte 0 -> 0x61
global after_stosb:function
after_stosb:
        lea     rsi, [rel sbyte]
        lea     rdi, [rel dbyte]
        movsb                                   ; read sbyte, write dbyte 0x61 -> 0x5a
global after_movsb:function
after_movsb:
        lea     rsi, [rel srcbuf]
        lea     rdi, [rel dbyte - 2]
        mov     ecx, 5
global rep_write:function
rep_write:
        rep movsb                               ; dbyte 0x5a -> 0x33 (srcbuf[2])
global after_rep_movsb:function
after_rep_movsb:
        lea     rsi, [rel sbyte - 2]
        lea     rdi, [rel dstbuf]
        mov     ecx, 5
global rep_read:function
rep_read:
        rep movsb                               ; reads sbyte once
global after_rep_read:function
after_rep_read:
global watch_done:function
watch_done:
        GUEST_EXIT EXIT_OK

align 64
global nearv:data 8
nearv:          dq 0
                db 0x41, 0x42
global sbyte:data 1
sbyte:          db 0x5a
                db 0x43, 0x44
                db 0, 0
global dbyte:data 1
dbyte:          db 0
                db 0, 0
global srcbuf:data 5
srcbuf:         db 0x31, 0x32, 0x33, 0x34, 0x35

section .data progbits alloc noexec write align=4096
global lone:data 8
lone:           dq 0
global dstbuf:data 8
dstbuf:         dq 0

section .bss nobits alloc noexec write align=4096
alignb 16
                resb 8192
stack_top:
