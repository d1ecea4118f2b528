; hello.asm -- the example kernel `scripts/demo` boots under gdbstub (PVH, x86-64).
;
; Entered like `qemu -kernel`: PVH note -> start32 in 32-bit protected mode, paging off.
; start32 identity-maps the first 1 GiB with 2 MiB pages, enables long mode and jumps to
; main64, which greets on COM1, computes a few Fibonacci numbers through `fib`, and then
; counts in `ticks` forever (interrupt it with Ctrl-C in gdb). Try:
;     break fib        continue        info registers        p/x $cr3
;     watch *(long*)&ticks              monitor page-table     monitor disas
bits 32
%define COM1 0x3f8

section .note.pvh note alloc noexec nowrite align=4
        dd 4, 8, 18                     ; namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
        db "Xen", 0
        dq start32

section .text progbits alloc exec nowrite align=16
global start32
start32:
        cli
        lgdt    [gdt_ptr]
        mov     edi, pml4                       ; PML4 -> PDPT -> PD (512 x 2 MiB)
        lea     eax, [pdpt + 3]
        mov     [edi], eax
        lea     eax, [pd + 3]
        mov     [pdpt], eax
        xor     ecx, ecx
.map:   mov     eax, ecx
        shl     eax, 21
        or      eax, 0x83                       ; present, writable, 2 MiB
        mov     [pd + ecx * 8], eax
        inc     ecx
        cmp     ecx, 512
        jne     .map
        mov     cr3, edi
        mov     eax, cr4
        or      eax, 1 << 5                     ; PAE
        mov     cr4, eax
        mov     ecx, 0xC0000080                 ; EFER.LME
        rdmsr
        or      eax, 1 << 8
        wrmsr
        mov     eax, cr0
        or      eax, 1 << 31                    ; paging on: long mode
        mov     cr0, eax
        jmp     0x08:main64

bits 64
global main64
main64:
        mov     ax, 0x10
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        lea     rsp, [stack_top]
        lea     rsi, [greeting]
        call    puts
        xor     ebx, ebx
.fibs:  mov     edi, ebx
        call    fib
        mov     [fibs + rbx * 8], rax
        inc     ebx
        cmp     ebx, 10
        jne     .fibs
        lea     rsi, [computed]
        call    puts
global idle
idle:   inc     qword [ticks]                   ; interrupt me
        jmp     idle

; fib(rdi) -> rax, iteratively
global fib
fib:    xor     eax, eax
        mov     edx, 1
        test    edi, edi
        jz      .done
.step:  lea     rcx, [rax + rdx]
        mov     rax, rdx
        mov     rdx, rcx
        dec     edi
        jnz     .step
.done:  ret

; puts(rsi): write a NUL-terminated string to COM1
puts:   mov     dx, COM1
.next:  lodsb
        test    al, al
        jz      .end
        out     dx, al
        jmp     .next
.end:   ret

section .rodata progbits alloc noexec nowrite align=16
greeting: db "Hello from the gdbstub example kernel!", 10, 0
computed: db "fib(0..9) computed; counting ticks now", 10, 0
align 8
gdt:    dq 0
        dq 0x00AF9A000000FFFF                   ; 0x08: 64-bit code
        dq 0x00CF92000000FFFF                   ; 0x10: data
gdt_ptr: dw $ - gdt - 1
        dd gdt

section .bss nobits alloc noexec write align=4096
pml4:   resb 4096
pdpt:   resb 4096
pd:     resb 4096
global ticks, fibs
ticks:  resq 1
fibs:   resq 10
        resb 8192
stack_top:
