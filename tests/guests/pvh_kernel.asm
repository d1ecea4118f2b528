; pvh_kernel.asm -- the main test kernel for gdbstub (PVH boot, higher-half x86-64).
;
; Boot: PVH note (owner "Xen", type 18) -> pvh_start32, entered in 32-bit protected mode with
; paging off and ebx = hvm_start_info.  The 32-bit part (section .boot, physical 1 MiB, VMA ==
; LMA) loads its GDT, builds 4-level page tables (low 1 GiB identity-mapped with 2 MiB pages
; and the same page directory mapped again at 0xffffffff80000000: PML4[511] -> PDPT[510]),
; enables PAE + LME + PG and jumps to main64 in the higher half.
;
; main64 then
;   * records boot_magic (eax at entry) and boot_info (ebx at entry),
;   * installs an IDT: vector 3 -> int3_handler (counts int3_hits and returns), the other 31
;     exception vectors -> exc_common (records last_exc_vector / last_exc_rip, prints
;     "EXCEPTION\n", exits with value 0x7e = status 0xfd),
;   * sets FS base = 0x0000123456789abc and GS base = 0xffff800012345000 (wrmsr),
;   * enables SSE, loads xmm0 = bytes 00 01 .. 0f (xmm0_value) and, when CPUID reports XSAVE
;     and AVX, sets CR4.OSXSAVE and XCR0 |= 7 and loads ymm1 = bytes 20 21 .. 3f (ymm1_value;
;     avx_enabled = 1); without AVX xmm1 = bytes 20 .. 2f (a fault from xsetbv or the first
;     AVX instruction also means "no AVX": exc_common resumes after simd_setup).  Nothing later touches SIMD state,
;   * prints "hello from pvh\n" on COM1, then dispatches on the qword `mode` (a test sets it
;     with the debugger before the guest reaches main64's dispatch; default 0):
;
;   mode 0  demo: add_numbers(1,2), (3,4), (5,6) at call_add_1/2/3 (sum_total = 21,
;           add_calls = 3, last_sum = 11), then demo_loop increments counter 100 times,
;           prints "done\n" and exits with value 0x10 (status 0x21).
;   mode 1  spin_loop forever:  spin_loop: inc qword [counter] / loop_body: nop / jmp.
;   mode 2  guest_int3: executes its own int3 (int3_hits becomes 1), after_int3 prints
;           "int3 handled\n" and exits with value 0x12 (status 0x25).
;   mode 3  triple fault: loads an empty IDT (limit 0) at do_triple_fault and executes ud2.
;   mode 4  halt_forever: cli; hlt (loops on hlt).
;   other   exits with value 0x7f (status 0xff).

bits 32

%include "common.inc"

%define KVMA            0xffffffff80000000
%define SEL_CODE64      0x08
%define SEL_DATA        0x10
%define SEL_CODE32      0x18
%define FS_BASE_VALUE   0x0000123456789abc
%define GS_BASE_VALUE   0xffff800012345000
%define MSR_FS_BASE     0xC0000100
%define MSR_GS_BASE     0xC0000101
%define MSR_EFER        0xC0000080
%define STACK_SIZE      16384
%define GDT_SIZE        32

; The file is assembled twice (see tests/guestbuild.py): with -DBOOT_PART for the 32-bit
; .boot part and with -DMAIN_PART (plus DWARF line info) for the higher half.  Two objects
; keep NASM's DWARF correct: it describes one contiguous range per object.

%ifdef BOOT_PART
extern main64
global boot_eax32, boot_ebx32, gdt

; ------------------------------------------------------------------ .boot (physical) -----
section .boot progbits alloc exec write align=16

global pvh_start32:function
pvh_start32:
        cli
        cld
        mov     [boot_eax32], eax
        mov     [boot_ebx32], ebx
        lgdt    [gdt32_ptr]
        jmp     SEL_CODE32:.reload
.reload:
        mov     ax, SEL_DATA
        mov     ds, ax
        mov     es, ax
        mov     fs, ax
        mov     gs, ax
        mov     ss, ax
        mov     esp, boot_stack_top

        ; page tables: clear 4 pages, link PML4 -> PDPTs -> one PD of 2 MiB pages
        mov     edi, pml4
        xor     eax, eax
        mov     ecx, 4 * 4096 / 4
        rep stosd
        mov     dword [pml4], pdpt_low + 3
        mov     dword [pml4 + 511 * 8], pdpt_high + 3
        mov     dword [pdpt_low], pd + 3
        mov     dword [pdpt_high + 510 * 8], pd + 3
        mov     edi, pd
        mov     eax, 0x83                       ; present, writable, 2 MiB
        mov     ecx, 512
.fill_pd:
        mov     [edi], eax
        add     eax, 0x200000
        add     edi, 8
        dec     ecx
        jnz     .fill_pd

        mov     eax, cr4
        or      eax, 1 << 5                     ; PAE
        mov     cr4, eax
        mov     eax, pml4
        mov     cr3, eax
        mov     ecx, MSR_EFER
        rdmsr
        or      eax, 1 << 8                     ; LME
        wrmsr
        mov     eax, cr0
        and     eax, ~((1 << 30) | (1 << 29))   ; caches on
        or      eax, (1 << 31) | 1              ; PG | PE
        mov     cr0, eax
        jmp     SEL_CODE64:long_low

bits 64
long_low:
        mov     ax, SEL_DATA
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     rax, main64
        jmp     rax

align 16
gdt:
        dq 0
        dq 0x00af9a000000ffff                   ; 0x08 64-bit code
        dq 0x00cf92000000ffff                   ; 0x10 flat data
        dq 0x00cf9a000000ffff                   ; 0x18 flat 32-bit code
gdt_end:

align 4
gdt32_ptr:
        dw GDT_SIZE - 1
        dd gdt

boot_eax32:     dd 0
boot_ebx32:     dd 0

align 4096
global pml4:data 4096
pml4:           times 4096 db 0
pdpt_low:       times 4096 db 0
pdpt_high:      times 4096 db 0
pd:             times 4096 db 0
boot_stack:     times 1024 db 0
boot_stack_top:

; --------------------------------------------------------------------------- PVH note ----
section .note.Xen note alloc noexec nowrite align=4
        dd 4                                    ; namesz
        dd 8                                    ; descsz
        dd 18                                   ; XEN_ELFNOTE_PHYS32_ENTRY
        db "Xen", 0
        dq pvh_start32
%endif ; BOOT_PART

%ifdef MAIN_PART
extern boot_eax32, boot_ebx32, gdt
; ------------------------------------------------------------------ .text (higher half) --
section .text progbits alloc exec nowrite align=16
bits 64

global main64:function
main64:
        lgdt    [rel gdt64_ptr]
        lea     rsp, [rel stack_top]
        xor     ebp, ebp
        mov     eax, [abs boot_eax32]
        mov     [rel boot_magic], rax
        mov     eax, [abs boot_ebx32]
        mov     [rel boot_info], rax

        call    idt_setup

        mov     ecx, MSR_FS_BASE
        mov     rax, FS_BASE_VALUE
        mov     rdx, rax
        shr     rdx, 32
        wrmsr
        mov     ecx, MSR_GS_BASE
        mov     rax, GS_BASE_VALUE
        mov     rdx, rax
        shr     rdx, 32
        wrmsr

        call    simd_setup
        call    serial_init
        lea     rsi, [rel msg_hello]
        call    serial_puts

global dispatch:function
dispatch:
        mov     rax, [rel mode]
        test    rax, rax
        jz      mode_demo
        cmp     rax, 1
        je      spin_loop
        cmp     rax, 2
        je      guest_int3
        cmp     rax, 3
        je      do_triple_fault
        cmp     rax, 4
        je      halt_forever
        GUEST_EXIT 0x7f

; ---- mode 0 --------------------------------------------------------------------------
global mode_demo:function
mode_demo:
global call_add_1:function
call_add_1:
        mov     edi, 1
        mov     esi, 2
        call    add_numbers
        add     [rel sum_total], rax
global call_add_2:function
call_add_2:
        mov     edi, 3
        mov     esi, 4
        call    add_numbers
        add     [rel sum_total], rax
global call_add_3:function
call_add_3:
        mov     edi, 5
        mov     esi, 6
        call    add_numbers
        add     [rel sum_total], rax
        mov     ecx, 100
global demo_loop:function
demo_loop:
        inc     qword [rel counter]
        dec     ecx
        jnz     demo_loop
global demo_done:function
demo_done:
        lea     rsi, [rel msg_done]
        call    serial_puts
        GUEST_EXIT EXIT_OK

; add_numbers(rdi, rsi) -> rax = rdi + rsi; also last_sum = rax, add_calls += 1
global add_numbers:function
add_numbers:
        push    rbp
        mov     rbp, rsp
        mov     rax, rdi
        add     rax, rsi
        mov     [rel last_sum], rax
        inc     qword [rel add_calls]
        pop     rbp
        ret

; ---- mode 1 --------------------------------------------------------------------------
align 16
global spin_loop:function
global loop_body:function
spin_loop:
        inc     qword [rel counter]
loop_body:
        nop
        jmp     spin_loop

; ---- mode 2 --------------------------------------------------------------------------
global guest_int3:function
global after_int3:function
guest_int3:
        int3
after_int3:
        lea     rsi, [rel msg_int3]
        call    serial_puts
        GUEST_EXIT 0x12

; ---- mode 3 --------------------------------------------------------------------------
global do_triple_fault:function
do_triple_fault:
        lidt    [rel empty_idt_ptr]
        ud2
        jmp     do_triple_fault

; ---- mode 4 --------------------------------------------------------------------------
global halt_forever:function
halt_forever:
        cli
        hlt
        jmp     halt_forever

; ---- interrupts ----------------------------------------------------------------------
global int3_handler:function
int3_handler:
        inc     qword [rel int3_hits]
        iretq

; exception stubs, 16 bytes each: push the vector, go to exc_common
align 16
exc_stubs:
%assign v 0
%rep 32
        push    qword v
        jmp     exc_common
        align   16
%assign v v + 1
%endrep

global exc_common:function
exc_common:
        pop     rax
        mov     [rel last_exc_vector], rax
        mov     edx, 0x60227D00                 ; vectors that push an error code
        bt      edx, eax
        jnc     .no_error_code
        add     rsp, 8
.no_error_code:
        mov     rax, [rsp]
        mov     [rel last_exc_rip], rax
        lea     rdx, [rel simd_setup.xsetbv]    ; a fault while enabling or first using AVX:
        cmp     rax, rdx                        ; the CPU has no usable AVX (kvm_pvm runs CPL0
        je      .no_avx                         ; code in an emulator without it): carry on
        lea     rdx, [rel simd_setup.avx_use]   ; without AVX
        cmp     rax, rdx
        jne     .fatal
.no_avx:
        lea     rdx, [rel simd_setup.done]
        mov     [rsp], rdx
        mov     qword [rel last_exc_vector], -1
        iretq
.fatal:
        lea     rsi, [rel msg_exc]
        call    serial_puts
        GUEST_EXIT 0x7e

; idt_setup: 32 interrupt gates (vector 3 -> int3_handler), lidt
idt_setup:
        lea     rdi, [rel idt]
        xor     ecx, ecx
.gate:
        lea     rax, [rel exc_stubs]
        mov     edx, ecx
        shl     edx, 4
        add     rax, rdx
        cmp     ecx, 3
        jne     .set
        lea     rax, [rel int3_handler]
.set:
        mov     rdx, rax
        mov     [rdi], dx                       ; offset 15:0
        mov     word [rdi + 2], SEL_CODE64
        mov     byte [rdi + 4], 0
        mov     byte [rdi + 5], 0x8E            ; present, DPL 0, interrupt gate
        shr     rdx, 16
        mov     [rdi + 6], dx                   ; offset 31:16
        shr     rdx, 16
        mov     [rdi + 8], edx                  ; offset 63:32
        mov     dword [rdi + 12], 0
        add     rdi, 16
        inc     ecx
        cmp     ecx, 32
        jb      .gate
        lidt    [rel idt_ptr]
        ret

; simd_setup: SSE on; xmm0/ymm1 get their known values (see the header)
simd_setup:
        mov     rax, cr0
        and     rax, ~(1 << 2)                  ; EM off
        or      rax, 1 << 1                     ; MP on
        mov     cr0, rax
        mov     rax, cr4
        or      rax, (1 << 9) | (1 << 10)       ; OSFXSR | OSXMMEXCPT
        mov     cr4, rax
        movdqu  xmm0, [rel xmm0_value]
        movdqu  xmm1, [rel ymm1_value]
        mov     eax, 1
        cpuid
        and     ecx, (1 << 26) | (1 << 28)      ; XSAVE, AVX
        cmp     ecx, (1 << 26) | (1 << 28)
        jne     .done
        mov     rax, cr4
        or      rax, 1 << 18                    ; OSXSAVE
        mov     cr4, rax
        xor     ecx, ecx
        xgetbv
        or      eax, 7                          ; x87 | SSE | AVX
.xsetbv:                                        ; a #GP here means "no AVX" (see exc_common)
        xsetbv
.avx_use:
        vmovdqu ymm1, [rel ymm1_value]
        mov     qword [rel avx_enabled], 1
.done:
        ret

DEFINE_SERIAL rsi

; ------------------------------------------------------------------------------ .rodata --
section .rodata progbits alloc noexec nowrite align=16
align 16
global xmm0_value:data 16
xmm0_value:
%assign i 0
%rep 16
        db i
%assign i i + 1
%endrep
global ymm1_value:data 32
ymm1_value:
%assign i 0x20
%rep 32
        db i
%assign i i + 1
%endrep
msg_hello:      db "hello from pvh", 10, 0
msg_done:       db "done", 10, 0
msg_int3:       db "int3 handled", 10, 0
msg_exc:        db "EXCEPTION", 10, 0

; -------------------------------------------------------------------------------- .data --
section .data progbits alloc noexec write align=4096
global mode:data 8
mode:           dq 0
global counter:data 8
counter:        dq 0
global sum_total:data 8
sum_total:      dq 0
global last_sum:data 8
last_sum:       dq 0
global add_calls:data 8
add_calls:      dq 0
global int3_hits:data 8
int3_hits:      dq 0
global avx_enabled:data 8
avx_enabled:    dq 0
global boot_magic:data 8
boot_magic:     dq 0
global boot_info:data 8
boot_info:      dq 0
global last_exc_vector:data 8
last_exc_vector: dq -1
global last_exc_rip:data 8
last_exc_rip:   dq 0
align 16
gdt64_ptr:
        dw GDT_SIZE - 1
        dq gdt + KVMA
align 16
idt_ptr:
        dw 32 * 16 - 1
        dq idt
align 16
empty_idt_ptr:
        dw 0
        dq 0

; --------------------------------------------------------------------------------- .bss --
section .bss nobits alloc noexec write align=4096
alignb 4096
global idt:data 512
idt:            resb 32 * 16
alignb 16
stack:          resb STACK_SIZE
global stack_top:data
stack_top:
%endif ; MAIN_PART
