; hv_long64.asm -- 64-bit code at 0x1000 (the test sets up long mode, e.g. CR3 = the page
; tables of gdbstub.machine.loader.build_page_tables, which identity-map 0-4 GiB):
; rax = 0x1122334455667788; qword [0x3000] = rax; out(0x10, al = 0x88); then counts:
; loop64 increments rbx and outs bl to port 0x11 five times (bl = 1..5), hlt.
bits 64
org 0x1000
        mov     rax, 0x1122334455667788
        mov     [abs 0x3000], rax
        out     0x10, al
        xor     ebx, ebx
loop64:
        inc     rbx
        mov     al, bl
        out     0x11, al
        cmp     rbx, 5
        jb      loop64
        hlt
