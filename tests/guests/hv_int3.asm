; hv_int3.asm -- any mode, at 0x1000: int3 (0xcc at 0x1000), then hlt at 0x1001.
bits 16
org 0x1000
        int3
        hlt
