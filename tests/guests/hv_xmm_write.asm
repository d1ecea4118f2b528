; hv_xmm_write.asm -- 16-bit real mode at 0x1000: xmm0 <- 00112233445566778899aabbccddeeff
; (bytes in memory order: 0x00, 0x11, ... 0xff), then hlt.
; Needs CR4.OSFXSR (bit 9) set and CR0.EM clear: set them before running.
bits 16
org 0x1000
        movdqu  xmm0, [xmm_value]
        hlt
align 16
xmm_value:
        db 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77
        db 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff
