; hv_rdmsr.asm -- 16-bit real mode at 0x1000: rdmsr of the MSR in ecx (set by the test), hlt.
; The result is in edx:eax at the hlt exit.
bits 16
org 0x1000
        rdmsr
        hlt
