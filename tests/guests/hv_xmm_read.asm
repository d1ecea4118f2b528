; hv_xmm_read.asm -- 16-bit real mode at 0x1000: stores xmm0 to memory at GPA 0x2000, hlt.
; Needs CR4.OSFXSR (bit 9) set and CR0.EM clear.
bits 16
org 0x1000
        xor     ax, ax
        mov     ds, ax
        movdqu  [0x2000], xmm0
        hlt
