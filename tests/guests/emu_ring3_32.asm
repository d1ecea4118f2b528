; emu_ring3_32.asm -- ring 3 under a 32-bit protected-mode kernel (flat, loaded at 0x1000).
;
; Built by tests/test_emu_ring3.py with guestbuild.assemble_flat (bits 32, org 0x1000). The
; vCPU starts at CPL0 in flat 32-bit protected mode without paging. The kernel loads its GDT
; (0x08 code, 0x10 data, 0x1b user code, 0x23 user data, 0x28 a 32-bit TSS with SS0:ESP0),
; an IDT and enters ring 3 with iretd. Checkpoints (OUT ports):
;
;   0x52  ring 3 waits: the test injects vector 0x20 after this exit
;   0x53  interrupt handler on SS0:ESP0: ebx = ESP (the frame), ecx = SS
;   0x54  #GP handler for a HLT in ring 3: ebx = ESP (error code, frame); it skips the HLT
;   0x55  ring 3 again: ebx = CS, ecx = SS; then spins

%define ESP0_TOP        0x9800
%define USER_STACK      0xC000

kernel:
        lgdt    [gdtr]
        jmp     0x08:.reloaded
.reloaded:
        mov     ax, 0x10
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     eax, tss
        mov     word [gdt + 0x28 + 2], ax
        shr     eax, 16
        mov     byte [gdt + 0x28 + 4], al
        mov     byte [gdt + 0x28 + 7], ah
        mov     ax, 0x28
        ltr     ax
        mov     edi, 0x20
        mov     esi, irq_handler
        call    set_gate
        mov     edi, 13
        mov     esi, gp_handler
        call    set_gate
        lidt    [idtr]
        mov     ax, 0x23
        mov     ds, ax
        mov     es, ax
        push    0x23
        push    USER_STACK
        push    0x3202                  ; IOPL 3, IF
        push    0x1b
        push    user
        iretd

; edi = vector, esi = handler: a present DPL0 32-bit interrupt gate
set_gate:
        lea     edi, [idt + edi * 8]
        mov     word [edi], si
        mov     word [edi + 2], 0x08
        mov     word [edi + 4], 0x8E00
        shr     esi, 16
        mov     word [edi + 6], si
        ret

irq_handler:
        mov     ebx, esp
        mov     ecx, ss
        out     0x53, al
        iretd

gp_handler:
        mov     ebx, esp
        out     0x54, al
        add     esp, 4
        inc     dword [esp]             ; past the hlt
        iretd

user:
        out     0x52, al
        nop
        hlt                             ; privileged: #GP(0)
        mov     ebx, cs
        mov     ecx, ss
        out     0x55, al
        jmp     $

align 8
gdt:    dq      0
        dq      0x00CF9B000000FFFF      ; 0x08 kernel code
        dq      0x00CF93000000FFFF      ; 0x10 kernel data
        dq      0x00CFFB000000FFFF      ; 0x1b user code
        dq      0x00CFF3000000FFFF      ; 0x23 user data
        dq      0x0000890000000067      ; 0x28 TSS (base filled in)
gdt_end:
gdtr:   dw      gdt_end - gdt - 1
        dd      gdt
align 4
tss:    dd      0
        dd      ESP0_TOP                ; ESP0
        dd      0x10                    ; SS0
        times 22 dd 0
        dw      0, 104                  ; I/O map base: none
idtr:   dw      256 * 8 - 1
        dd      idt
align 8
idt:    times 256 * 8 db 0
