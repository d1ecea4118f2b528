; emu_ring3.asm -- a tiny kernel and its ring-3 program (64-bit, flat, loaded at 0x1000).
;
; Built by tests/test_emu_ring3.py with guestbuild.assemble_flat (bits 64, org 0x1000). The
; vCPU starts in long mode at CPL0 with identity paging of the first 2 MiB (user pages), as
; tests/hvguest.setup_long_mode leaves it. The kernel part sets up what Linux does: its own GDT
; (Linux's layout: 0x10 kernel code, 0x18 kernel data, 0x23/0x2b/0x33 user code32/data/code64,
; 0x40 a 64-bit TSS with RSP0 and IST1), an IDT, EFER.SCE, STAR/LSTAR/FMASK, KERNEL_GS_BASE,
; and enters ring 3 with iretq. Every OUT is a checkpoint at which the test reads registers:
;
;   0x50  syscall handler, CPL0: r8 = CS, r9 = SS, r10 = RFLAGS, rcx/r11 as SYSCALL left them,
;         rbx = its stack pointer (the per-CPU kernel stack via swapgs), rdi = the argument
;   0x51  back in ring 3 after sysretq: rax = argument + 1, r8 = CS, r9 = SS
;   0x52  ring 3 waits for an interrupt: the test injects vector 0x20 after this exit
;   0x53  interrupt handler (RSP0 stack): rbx = RSP (the frame), r8 = CS, r9 = SS
;   0x54  #PF handler (IST1 stack): rbx = RSP (error code, frame), rcx = CR2
;   0x55  ring 3 again, after the faulting store was skipped: r8 = CS, r9 = SS
;
; then the program far-returns to 32-bit compatibility mode (CS 0x23) and enters the kernel as
; Linux's 32-bit programs do:
;
;   0x56  int 0x80 (a DPL3 gate, RSP0 stack): rbx = RSP (the frame), eax = 7
;   0x57  back in compat mode after iretq: eax = 8, ebx = CS
;   0x58  sysenter: r8 = CS, r9 = SS, r10 = RFLAGS, rbx = RSP (SYSENTER_ESP); returns with
;         sysretl (ECX = the return address the program left in EBP, ESP from ESI)
;   0x59  back in compat mode: ebx = CS, ecx = SS; then spins

%define KERNEL_CS       0x10
%define KERNEL_DS       0x18
%define USER32_CS       0x23
%define USER_DS         0x2b
%define USER_CS         0x33
%define TSS_SEL         0x40
%define RSP0_TOP        0x9800
%define IST1_TOP        0xA800
%define SYSCALL_STACK   0xB800
%define USER_STACK      0xC000
%define PERCPU          0xD000
%define FAULT_ADDRESS   0x400000        ; beyond the 2 MiB that are mapped
%define SYSENTER_STACK  0xB000

kernel:
        lgdt    [gdtr]
        mov     ax, KERNEL_DS
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        push    KERNEL_CS
        push    .reloaded
        retfq
.reloaded:
        ; the TSS descriptor: base = tss, limit 0x67, type 0x89 (available 64-bit TSS)
        mov     rax, tss
        mov     word [gdt + TSS_SEL + 2], ax
        shr     rax, 16
        mov     byte [gdt + TSS_SEL + 4], al
        mov     byte [gdt + TSS_SEL + 7], ah
        mov     ax, TSS_SEL
        ltr     ax
        ; the IDT: vector 0x20 on RSP0, #PF on IST1
        mov     rdi, 0x20
        mov     rsi, irq_handler
        xor     edx, edx
        call    set_gate
        mov     rdi, 14
        mov     rsi, pf_handler
        mov     edx, 1
        call    set_gate
        mov     rdi, 0x80
        mov     rsi, int80_handler
        xor     edx, edx
        call    set_gate
        or      byte [idt + 0x80 * 16 + 5], 0x60    ; DPL 3: ring 3 may INT 0x80
        lidt    [idtr]
        ; SYSCALL: EFER.SCE, STAR, LSTAR, FMASK; swapgs finds the per-CPU area
        mov     ecx, 0xC0000080
        rdmsr
        or      eax, 1
        wrmsr
        mov     ecx, 0xC0000081
        xor     eax, eax
        mov     edx, (USER32_CS << 16) | KERNEL_CS
        wrmsr
        mov     ecx, 0xC0000082
        mov     eax, syscall_entry
        xor     edx, edx
        wrmsr
        mov     ecx, 0xC0000084
        mov     eax, 0x47700            ; TF DF IF IOPL AC NT, as Linux
        xor     edx, edx
        wrmsr
        mov     ecx, 0xC0000102         ; KERNEL_GS_BASE
        mov     eax, PERCPU
        xor     edx, edx
        wrmsr
        mov     qword [PERCPU + 8], SYSCALL_STACK
        mov     ecx, 0x174              ; SYSENTER_CS, _ESP, _EIP
        mov     eax, KERNEL_CS
        xor     edx, edx
        wrmsr
        mov     ecx, 0x175
        mov     eax, SYSENTER_STACK
        wrmsr
        mov     ecx, 0x176
        mov     eax, sysenter_entry
        wrmsr
        ; to ring 3
        mov     ax, USER_DS
        mov     ds, ax
        mov     es, ax
        push    USER_DS
        push    USER_STACK
        push    0x3202                  ; IOPL 3 (the program reports with OUT), IF
        push    USER_CS
        push    user
        iretq

; rdi = vector, rsi = handler, edx = IST index; a present DPL0 interrupt gate
set_gate:
        shl     rdi, 4
        add     rdi, idt
        mov     word [rdi], si
        mov     word [rdi + 2], KERNEL_CS
        mov     byte [rdi + 4], dl
        mov     byte [rdi + 5], 0x8E
        shr     rsi, 16
        mov     word [rdi + 6], si
        shr     rsi, 16
        mov     dword [rdi + 8], esi
        mov     dword [rdi + 12], 0
        ret

syscall_entry:
        swapgs
        mov     [gs:0], rsp
        mov     rsp, [gs:8]
        push    rcx
        push    r11
        mov     r8, cs
        mov     r9, ss
        pushfq
        pop     r10
        mov     rbx, rsp
        out     0x50, al
        lea     rax, [rdi + 1]
        pop     r11
        pop     rcx
        mov     rsp, [gs:0]
        swapgs
        o64 sysret

irq_handler:
        mov     rbx, rsp
        mov     r8, cs
        mov     r9, ss
        out     0x53, al
        iretq

int80_handler:
        mov     rbx, rsp
        out     0x56, al
        inc     eax
        iretq

sysenter_entry:
        mov     r8, cs
        mov     r9, ss
        pushfq
        pop     r10
        mov     rbx, rsp
        out     0x58, al
        mov     ecx, ebp                ; where the program continues
        mov     r11d, 0x3202
        mov     esp, esi                ; its stack
        sysret                          ; sysretl: to compatibility mode

pf_handler:
        mov     rbx, rsp
        mov     rcx, cr2
        mov     r8, cs
        mov     r9, ss
        out     0x54, al
        add     rsp, 8                  ; the error code
        add     qword [rsp], fault_end - fault_insn ; skip the store
        iretq

user:
        mov     r12, 3
.again:
        mov     rdi, r12
        shl     rdi, 8
        mov     eax, 60
        syscall
        mov     r8, cs
        mov     r9, ss
        out     0x51, al
        dec     r12
        jnz     .again
        out     0x52, al
        mov     r8, cs                  ; the interrupt returns here
        nop
fault_insn:
        mov     [FAULT_ADDRESS], eax
fault_end:
        mov     r8, cs
        mov     r9, ss
        out     0x55, al
        push    USER32_CS               ; to compatibility mode, still ring 3
        push    compat
        retfq

bits 32
compat:
        mov     eax, 7
        int     0x80
        mov     ebx, cs
        out     0x57, al
        mov     ebp, .back
        mov     esi, esp
        sysenter
.back:
        mov     ebx, cs
        mov     ecx, ss
        out     0x59, al
        jmp     $
bits 64

align 16
gdt:    dq      0
        dq      0x00CF9B000000FFFF      ; 0x08 kernel code32
        dq      0x00AF9B000000FFFF      ; 0x10 kernel code64
        dq      0x00CF93000000FFFF      ; 0x18 kernel data
        dq      0x00CFFB000000FFFF      ; 0x23 user code32
        dq      0x00CFF3000000FFFF      ; 0x2b user data
        dq      0x00AFFB000000FFFF      ; 0x33 user code64
        dq      0
        dq      0x0000890000000067, 0   ; 0x40 TSS (base filled in)
gdt_end:
gdtr:   dw      gdt_end - gdt - 1
        dq      gdt
align 16
tss:    dd      0
        dq      RSP0_TOP                ; RSP0
        dq      0, 0                    ; RSP1, RSP2
        dq      0
        dq      IST1_TOP                ; IST1
        times 6 dq 0
        dq      0
        dw      0, 104                  ; I/O map base: none
idtr:   dw      256 * 16 - 1
        dq      idt
align 16
idt:    times 256 * 16 db 0
