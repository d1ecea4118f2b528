; pc_kernel.asm -- a QEMU-style test kernel for the PC platform (our own code).
;
; 32-bit PVH kernel (Xen PHYS32_ENTRY note), flat segments, paging off; all output goes to the
; 0xE9 debug console. The command line (hvm_start_info) selects what it does:
;
;   "quick"  print "pc_kernel\n" and power off through ACPI (0x2000 to port 0x604): the
;            process must end with status 0, as under QEMU.
;   "tsc"    print the TSC ticks of half a second, and across tsc_mark (see tsc_test).
;   "idle"   set up the PIT at ~100 Hz through the 8259, then `sti; hlt` for ever (ticks
;            counts the interrupts).
;   else     also print the command line and the first bytes of the initrd (PVH module 0),
;            the RTC's date and time, then count for half a second of ACPI PM-timer time
;            (3.579545 MHz, a clock independent of the timers under test):
;              * PIT channel 0, mode 2, ~100 Hz, through the 8259 (IRQ0 -> vector 0x20),
;              * local APIC timer, periodic, divide by 16, initial count 62500, vector 0x40;
;            and how far the APIC timer's current count fell (its rate) against the PM timer,
;            then power off. Lines: "pit ticks: N", "lapic ticks: N", "pm ticks: N" and
;            "lapic count: N" (the count fell by N while the PM timer advanced by its N).

bits 32

%define DEBUGCON        0xe9
%define PM_TMR          0x608
%define PM1_CNT         0x604
%define LAPIC           0xfee00000
%define HALF_SECOND     1789772         ; PM-timer ticks

section .note.Xen note alloc
        align 4
        dd 4, 4, 18                     ; namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
        db "Xen", 0
        dd pvh_entry

section .text
global pvh_entry
pvh_entry:
        cli
        mov     esp, stack_top
        mov     [start_info], ebx
        mov     esi, msg_hello
        call    puts
        ; command line
        mov     ebx, [start_info]
        mov     esi, [ebx + 24]         ; cmdline_paddr (low half)
        mov     [cmdline], esi
        cmp     dword [esi], "quic"
        je      power_off
        push    esi
        mov     esi, msg_cmdline
        call    puts
        pop     esi
        call    puts
        call    newline
        ; initrd: nr_modules at 12, modlist_paddr at 16, entry {paddr, size, ...}
        mov     ebx, [start_info]
        cmp     dword [ebx + 12], 0
        je      .no_initrd
        mov     ebx, [ebx + 16]
        mov     esi, msg_initrd
        call    puts
        mov     esi, [ebx]              ; paddr
        mov     ecx, [ebx + 8]          ; size
        cmp     ecx, 16
        jbe     .copy
        mov     ecx, 16
.copy:  mov     edi, buffer
        rep movsb
        mov     byte [edi], 0
        mov     esi, buffer
        call    puts
        call    newline
.no_initrd:
        call    print_rtc
        ; IDT
        mov     eax, irq0_handler
        mov     ebx, 0x20
        call    set_gate
        mov     eax, lapic_handler
        mov     ebx, 0x40
        call    set_gate
        mov     eax, spurious_handler
        mov     ebx, 0xff
        call    set_gate
        mov     eax, spurious_handler
        mov     ebx, 0x27
        call    set_gate
        lidt    [idt_ptr]
        ; 8259: base 0x20/0x28, only IRQ0 unmasked
        mov     al, 0x11
        out     0x20, al
        out     0xa0, al
        mov     al, 0x20
        out     0x21, al
        mov     al, 0x28
        out     0xa1, al
        mov     al, 4
        out     0x21, al
        mov     al, 2
        out     0xa1, al
        mov     al, 1
        out     0x21, al
        out     0xa1, al
        mov     al, 0xfe
        out     0x21, al
        mov     al, 0xff
        out     0xa1, al
        ; PIT channel 0, mode 2, 11932 (~100 Hz)
        mov     al, 0x34
        out     0x43, al
        mov     ax, 11932
        out     0x40, al
        mov     al, ah
        out     0x40, al
        mov     dword [ticks], 0
        mov     esi, [cmdline]
        cmp     dword [esi], "idle"
        je      idle
        cmp     dword [esi], "tsc "
        je      tsc_test
        call    wait_half_second
        mov     esi, msg_pit
        mov     eax, [ticks]
        call    print_number_line
        ; mask the PIC, enable the local APIC with a periodic timer
        mov     al, 0xff
        out     0x21, al
        mov     dword [LAPIC + 0xf0], 0x1ff     ; SVR: enable, spurious 0xff
        mov     dword [LAPIC + 0x3e0], 0x3      ; divide by 16
        mov     dword [LAPIC + 0x320], 0x20040  ; periodic, vector 0x40
        mov     dword [ticks], 0
        mov     dword [LAPIC + 0x380], 62500    ; initial count
        call    wait_half_second
        mov     esi, msg_lapic
        mov     eax, [ticks]
        call    print_number_line
        ; the count's rate: one-shot from 0xffffffff, masked, over half a second
        mov     dword [LAPIC + 0x320], 0x10040  ; one-shot, masked
        mov     dword [LAPIC + 0x380], 0xffffffff
        mov     byte [busy], 1
        call    wait_half_second        ; also takes c0 right after its first PM-timer read
        mov     eax, [LAPIC + 0x390]
        mov     [c1], eax
        mov     dx, PM_TMR
        in      eax, dx
        sub     eax, [t0]
        and     eax, 0xffffff
        mov     esi, msg_pm
        call    print_number_line
        mov     eax, [c0]
        sub     eax, [c1]
        mov     esi, msg_count
        call    print_number_line
        jmp     power_off

; "tsc ": the TSC ticks of half a second of PM-timer time, then the ticks across tsc_mark (a
; debugger holds the guest there), both as 16 hex digits
tsc_test:
        mov     byte [busy], 1
        rdtsc
        mov     [tsc0], eax
        mov     [tsc0 + 4], edx
        call    wait_half_second
        rdtsc
        mov     esi, msg_tsc_ref
        call    print_tsc_delta
        rdtsc
        mov     [tsc0], eax
        mov     [tsc0 + 4], edx
global tsc_mark
tsc_mark:
        nop
        rdtsc
        mov     esi, msg_tsc_stop
        call    print_tsc_delta
        jmp     power_off

; print esi, then edx:eax - [tsc0] as 16 hex digits and a newline
print_tsc_delta:
        sub     eax, [tsc0]
        sbb     edx, [tsc0 + 4]
        push    eax
        push    edx
        call    puts
        pop     eax
        call    hex8
        pop     eax
        call    hex8
        jmp     newline

hex8:
        mov     ecx, 8
.digit: rol     eax, 4
        push    eax
        and     al, 0x0f
        call    hexdigit
        pop     eax
        loop    .digit
        ret

; "idle": halt with the PIT ticking, for ever (for the debugger tests)
idle:
        sti
        hlt
        jmp     idle

power_off:
        mov     esi, msg_bye
        call    puts
        mov     dx, PM1_CNT
        mov     ax, 0x2000
        out     dx, ax
.hang:  cli
        hlt
        jmp     .hang

; wait until the PM timer has advanced HALF_SECOND ticks, halting with interrupts on (or
; polling, when [busy] is set and no interrupt would come)
wait_half_second:
        mov     dx, PM_TMR
        in      eax, dx
        and     eax, 0xffffff
        mov     [t0], eax
        mov     eax, [LAPIC + 0x390]
        mov     [c0], eax
.loop:  cmp     byte [busy], 0
        jne     .spin
        sti
        hlt
        cli
.spin:
        mov     dx, PM_TMR
        in      eax, dx
        and     eax, 0xffffff
        sub     eax, [t0]
        and     eax, 0xffffff
        cmp     eax, HALF_SECOND
        jb      .loop
        ret

irq0_handler:
        push    eax
        inc     dword [ticks]
        mov     al, 0x20
        out     0x20, al
        pop     eax
        iret

lapic_handler:
        inc     dword [ticks]
        mov     dword [LAPIC + 0xb0], 0
        iret

spurious_handler:
        iret

; eax = handler, ebx = vector
set_gate:
        lea     edi, [idt + ebx * 8]
        mov     [edi], ax
        mov     word [edi + 2], cs
        mov     word [edi + 4], 0x8e00
        shr     eax, 16
        mov     [edi + 6], ax
        ret

print_rtc:
        mov     esi, msg_rtc
        call    puts
.uip:   mov     al, 0x0a
        out     0x70, al
        in      al, 0x71
        test    al, 0x80
        jnz     .uip
        mov     al, 9                   ; year
        call    print_cmos
        mov     al, '-'
        call    putc
        mov     al, 8                   ; month
        call    print_cmos
        mov     al, '-'
        call    putc
        mov     al, 7                   ; day
        call    print_cmos
        mov     al, ' '
        call    putc
        mov     al, 4
        call    print_cmos
        mov     al, ':'
        call    putc
        mov     al, 2
        call    print_cmos
        mov     al, ':'
        call    putc
        mov     al, 0
        call    print_cmos
        call    newline
        ret

; print CMOS register al as two hex digits (BCD, the RTC's default)
print_cmos:
        out     0x70, al
        in      al, 0x71
        push    eax
        shr     al, 4
        call    hexdigit
        pop     eax
        and     al, 0xf
        call    hexdigit
        ret

hexdigit:
        add     al, '0'
        cmp     al, '9'
        jbe     putc
        add     al, 7
putc:
        out     DEBUGCON, al
        ret

newline:
        mov     al, 10
        jmp     putc

puts:
        lodsb
        test    al, al
        jz      .done
        out     DEBUGCON, al
        jmp     puts
.done:  ret

; print the string at esi, then eax in decimal, then a newline
print_number_line:
        push    eax
        call    puts
        pop     eax
        mov     edi, buffer + 15
        mov     byte [edi], 0
        mov     ecx, 10
.digit: xor     edx, edx
        div     ecx
        add     dl, '0'
        dec     edi
        mov     [edi], dl
        test    eax, eax
        jnz     .digit
        mov     esi, edi
        call    puts
        jmp     newline

msg_hello:      db "pc_kernel", 10, 0
msg_cmdline:    db "cmdline: ", 0
msg_initrd:     db "initrd: ", 0
msg_rtc:        db "rtc: ", 0
msg_pit:        db "pit ticks: ", 0
msg_lapic:      db "lapic ticks: ", 0
msg_count:      db "lapic count: ", 0
msg_pm:         db "pm ticks: ", 0
msg_bye:        db "bye", 10, 0
msg_tsc_ref:    db "tsc half second: ", 0
msg_tsc_stop:   db "tsc across the stop: ", 0

        align 8
idt_ptr:
        dw 256 * 8 - 1
        dd idt

section .bss
        alignb 16
idt:            resb 256 * 8
start_info:     resd 1
cmdline:        resd 1
ticks:          resd 1
t0:             resd 1
tsc0:           resd 2
c0:             resd 1
c1:             resd 1
busy:           resb 1
buffer:         resb 32
                resb 8192
stack_top:
