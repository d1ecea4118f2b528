; mb_pc_kernel.asm -- a Multiboot kernel that uses what a PC's BIOS and chipset leave it (our own
; code): the BIOS data area, the CMOS clock and NVRAM, the 8254's read-back status, and the
; i8042 reset line. Loaded at 1 MiB (a.out kludge), 32-bit protected mode, paging off; all
; output on the 0xE9 debug console.
;
;   boot N       N = CMOS NVRAM byte 0x50 (kept across resets, as on a PC), then N + 1 is stored
;   ebda: XXXX   the EBDA segment from BDA word 0x40E, "basemem: XXXX" the KiB at 0x413 (hex)
;   rtc: SS      the seconds register read after the update-in-progress bit goes 1 -> 0
;   pit: out     channel 0 in mode 0 reached terminal count (read-back status bit 7)
;   then it "panics": on its first boot it resets through the i8042 (0xFE to port 0x64,
;   after polling the input-buffer bit), on the second it powers off through ACPI.

%include "common.inc"

%define MB_MAGIC        0x1BADB002
%define MB_FLAGS        0x00010003
%define DEBUGCON        0xe9

extern _load_start, _load_end, _bss_end

section .multiboot progbits alloc exec nowrite align=4
bits 32
mb_header:
        dd MB_MAGIC
        dd MB_FLAGS
        dd -(MB_MAGIC + MB_FLAGS)
        dd mb_header
        dd _load_start
        dd _load_end
        dd _bss_end
        dd mb_entry

section .text progbits alloc exec nowrite align=16
global mb_entry:function
mb_entry:
        cli
        mov     esp, stack_top
        ; boot counter in CMOS NVRAM
        mov     al, 0x50
        out     0x70, al
        in      al, 0x71
        mov     [boots], al
        mov     esi, msg_boot
        call    puts
        movzx   eax, byte [boots]
        call    hex4
        call    newline
        mov     al, 0x50
        out     0x70, al
        mov     al, [boots]
        inc     al
        out     0x71, al
        ; BIOS data area
        mov     esi, msg_ebda
        call    puts
        movzx   eax, word [0x40e]
        call    hex4
        call    newline
        mov     esi, msg_basemem
        call    puts
        movzx   eax, word [0x413]
        call    hex4
        call    newline
        ; CMOS clock: wait for an update (UIP 1 -> 0)
.uip_set:
        mov     al, 0x0a
        out     0x70, al
        in      al, 0x71
        test    al, 0x80
        jz      .uip_set
.uip_clear:
        mov     al, 0x0a
        out     0x70, al
        in      al, 0x71
        test    al, 0x80
        jnz     .uip_clear
        xor     al, al
        out     0x70, al
        in      al, 0x71
        mov     esi, msg_rtc
        call    puts
        movzx   eax, al
        call    hex4
        call    newline
        ; PIT channel 0, mode 0, count 1000; poll the read-back status for OUT
        mov     al, 0x30
        out     0x43, al
        mov     al, 0xe8
        out     0x40, al
        mov     al, 0x03
        out     0x40, al
.pit:   mov     al, 0xe2                ; read-back: status only, channel 0
        out     0x43, al
        in      al, 0x40
        test    al, 0x80
        jz      .pit
        mov     esi, msg_pit
        call    puts
        ; "panic"
        mov     esi, msg_panic
        call    puts
        cmp     byte [boots], 0
        jne     .off
.kbc:   in      al, 0x64
        test    al, 2
        jnz     .kbc
        mov     al, 0xfe
        out     0x64, al
.hang:  hlt
        jmp     .hang
.off:   mov     dx, 0x604
        mov     ax, 0x2000
        out     dx, ax
        jmp     .hang

puts:   push    eax
.next:  lodsb
        test    al, al
        jz      .done
        out     DEBUGCON, al
        jmp     .next
.done:  pop     eax
        ret

newline:
        push    eax
        mov     al, 10
        out     DEBUGCON, al
        pop     eax
        ret

; eax (16 bits) as four hex digits
hex4:   push    eax
        push    ecx
        mov     ecx, 4
.digit: rol     ax, 4
        push    eax
        and     al, 0x0f
        add     al, '0'
        cmp     al, '9'
        jbe     .out
        add     al, 7
.out:   out     DEBUGCON, al
        pop     eax
        loop    .digit
        pop     ecx
        pop     eax
        ret

msg_boot:       db "boot ", 0
msg_ebda:       db "ebda: ", 0
msg_basemem:    db "basemem: ", 0
msg_rtc:        db "rtc: ", 0
msg_pit:        db "pit: out", 10, 0
msg_panic:      db "panic", 10, 0

section .data
boots:          db 0

section .bss
                alignb 16
                resb 4096
stack_top:
