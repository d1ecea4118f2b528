; hv_in_out.asm -- 16-bit real mode at 0x1000: al = in(0x11); out(0x11, al + 1); hlt.
bits 16
org 0x1000
        in      al, 0x11
        inc     al
        out     0x11, al
        hlt
