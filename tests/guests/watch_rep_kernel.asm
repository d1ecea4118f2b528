; watch_rep_kernel.asm -- REP string instructions for the watchpoint tests
; (tests/test_watchpoints.py, test_rep_string_watchpoint_stops_after_each_iteration).
;
; A plain ELF64 kernel (elf64.ld), entered at _start in 64-bit long mode, the low 4 GiB
; identity-mapped. Each block is a REP string instruction (rep_* label, after_* just after it)
; reading watched data that lies in the page of the code, so that a read watchpoint makes the
; code's page execute-only:
;
;   rep movsb    6 bytes from rbuf - 1: reads each byte of the dword rbuf once (iterations 2-5)
;   repe cmpsb   count 8 over left/right, which differ at byte 3: ends after 4 iterations on
;                ZF = 0, so bytes 4-7 of the qword left are never read
;   repne scasb  count 8 over sbuf for al = 0, found at byte 2: ends after 3 iterations (ZF = 1)
;   a32 rep movsb  address size 32 (count ECX, addresses ESI/EDI, through the identity map)
;                with RCX = 0x1_0000_0003: 3 iterations from abuf - 1, reading the word abuf
;                in the last two
;
; At the end the guest exits with EXIT_OK (status 0x21).

%include "common.inc"

section .text progbits alloc exec write align=4096
bits 64

global _start:function
_start:
        lea     rsp, [rel stack_top]
        cld

global movs_block:function
movs_block:
        lea     rsi, [rel rbuf - 1]
        lea     rdi, [rel dst]
        mov     ecx, 6
global rep_movs:function
rep_movs:
        rep movsb
global after_rep_movs:function
after_rep_movs:

global cmps_block:function
cmps_block:
        lea     rsi, [rel left]
        lea     rdi, [rel right]
        mov     ecx, 8
global rep_cmps:function
rep_cmps:
        repe cmpsb
global after_rep_cmps:function
after_rep_cmps:

global scas_block:function
scas_block:
        lea     rdi, [rel sbuf]
        xor     eax, eax
        mov     ecx, 8
global rep_scas:function
rep_scas:
        repne scasb
global after_rep_scas:function
after_rep_scas:

global a32_block:function
a32_block:
        lea     rsi, [rel abuf - 1]
        and     esi, 0x7fffffff                 ; the identity-mapped (physical) address
        lea     rdi, [rel dst]
        and     edi, 0x7fffffff
        mov     rcx, 0x100000003                ; ECX = 3: the upper half is not the count
global rep_a32:function
rep_a32:
        a32 rep movsb
global after_rep_a32:function
after_rep_a32:
        GUEST_EXIT EXIT_OK

align 64
                db 0x10, 0x11, 0x12
                db 0x13                         ; rbuf - 1
global rbuf:data 4
rbuf:           db 0x21, 0x22, 0x23, 0x24
                db 0x25                         ; rbuf + 4
align 8
global left:data 8
left:           db "abcXwxyz"
global right:data 8
right:          db "abcYwxyz"
global sbuf:data 8
sbuf:           db "xy", 0, "zzzzz"
                db 0x2f                         ; (abuf word-aligned)
                db 0x30                         ; abuf - 1
global abuf:data 2
abuf:           db 0x41, 0x42
align 16
global dst:data 16
dst:            times 16 db 0

section .bss nobits alloc noexec write align=4096
alignb 16
                resb 8192
stack_top:
