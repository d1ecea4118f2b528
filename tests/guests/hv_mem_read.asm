; hv_mem_read.asm -- 16-bit real mode at 0x1000: eax = dword at GPA 0x3000; out(0x10, eax);
; hlt.  For address-space tests: map different memory at 0x3000 and compare the value.
bits 16
org 0x1000
        xor     ax, ax
        mov     ds, ax
        mov     eax, [0x3000]
        out     0x10, eax
        hlt
