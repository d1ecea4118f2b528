; hv_unmapped_write.asm -- 16-bit real mode at 0x1000: byte [GPA 0x90000] = 0x5a, hlt.
; Leave 0x90000 unmapped to get an EPT-violation (MMIO) exit.
bits 16
org 0x1000
        mov     ax, 0x9000
        mov     ds, ax
        mov     byte [0], 0x5a
        hlt
