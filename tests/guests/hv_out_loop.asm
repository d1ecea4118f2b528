; hv_out_loop.asm -- 16-bit real mode at 0x1000: out al to port 0x10 forever, al = 0, 1, 2...
bits 16
org 0x1000
        xor     ax, ax
out_loop:
        out     0x10, al
        inc     al
        jmp     out_loop
