; hv_wrmsr.asm -- 16-bit real mode at 0x1000: wrmsr ecx <- edx:eax (set by the test), hlt.
bits 16
org 0x1000
        wrmsr
        hlt
