; hv_hlt.asm -- 16-bit real mode at 0x1000: hlt (at 0x1000); after a wake-up, hlt again.
bits 16
org 0x1000
halt:
        hlt
        jmp     halt
