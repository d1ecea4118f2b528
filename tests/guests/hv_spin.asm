; hv_spin.asm -- any mode, at 0x1000: jmp $ (spins until interrupted; 2 bytes, eb fe).
bits 16
org 0x1000
        jmp     $
