; hv_unmapped_read.asm -- 16-bit real mode at 0x1000: al = byte at GPA 0x90000 (ds = 0x9000),
; out(0x10, al), hlt.  Leave 0x90000 unmapped to get an EPT-violation (MMIO) exit.
bits 16
org 0x1000
        mov     ax, 0x9000
        mov     ds, ax
        mov     al, [0]
        out     0x10, al
        hlt
