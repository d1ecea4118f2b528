"""The boot protocols of ``gdbstub run KERNEL``: one module per protocol, pure (no VM calls).

Theory of operation
===================

:func:`gdbstub.machine.loader.load_kernel` reads the image and asks each protocol in turn, in the
order QEMU's ``-kernel`` uses, whether it is theirs; the first that recognises it turns it into a
:class:`~gdbstub.machine.boot.common.BootPlan`: the bytes to write into guest RAM (kernel image,
boot structures, initrd) and the boot vCPU's initial state.

* :mod:`.linux` -- a bzImage (setup header ``"HdrS"`` at 0x202): the 64-bit Linux boot protocol.
* :mod:`.multiboot` -- a Multiboot v1 header in the first 8 KiB.
* :mod:`.pvh` -- an ELF with the Xen PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``).
* :mod:`.elf64` -- any other x86-64 ELF, entered in long mode.

Shared pieces: :mod:`.common` (plan and CPU-state types, the boot area, command line and initrd
helpers), :mod:`.cpu` (GDTs, page tables, initial CPU states), :mod:`.e820` (the memory map every
protocol hands out, from :mod:`gdbstub.machine.firmware.layout`) and :mod:`.elfimage` (reading
ELF segments, notes and symbols).

Guest-physical memory used by the loader
----------------------------------------
Everything the loader writes, except the kernel and the initrd, lives in the boot area
``[BOOT_AREA_START, BOOT_AREA_END)`` = 0x1000-0x10000: above the firmware's IVT (0-0x3ff) and
BDA (0x400-0x4ff), inside the first 64 KiB that Linux reserves anyway, far below the usual 1 MiB
kernel base and the firmware's area (0x9fc00-0x100000: EBDA, ACPI tables, MP table, BIOS stubs).

======== ==================================================================================
0x1000   GDT (``GDT_ADDR``), limit 0x2f.  PVH, Multiboot and ELF64: 0x08 flat 32-bit code,
         0x10 flat data, 0x18 64-bit code.  Linux: 0x08 flat 32-bit code, 0x10 64-bit code
         (``__BOOT_CS``), 0x18 flat data (``__BOOT_DS``).  Both: 0x20 busy TSS (16-byte system
         descriptor; 0x28 is its upper half).
0x1080   TSS (``TSS_ADDR``), 0x68 bytes of zeros.
0x2000   boot information (``BOOT_INFO_ADDR``): ``hvm_start_info`` (PVH and ELF64), the
         Multiboot information structure (Multiboot) or the zero page, ``struct boot_params``,
         4 KiB (Linux).
0x2040   PVH/ELF64: ``hvm_memmap_table_entry`` array (``MEMMAP_ADDR``).
0x2080   Multiboot: the module entry (``MB_MODS_ADDR``).
0x2100   Multiboot: mmap entries (``MB_MMAP_ADDR``).
0x2800   PVH/ELF64: ``hvm_modlist_entry`` of the initrd (``MODLIST_ADDR``).
0x2c00   Multiboot: the module's string (``MB_MOD_STRING_ADDR``, at most 0x300 bytes).
0x2f00   Multiboot: boot loader name "gdbstub".
0x3000   command line, NUL terminated (``CMDLINE_ADDR``, at most ``CMDLINE_MAX`` bytes).
0x4000   ELF64 and Linux: PML4 (``PML4_ADDR`` = CR3); 0x5000 PDPT for the low 4 GiB; 0x6000
         PDPT for the top 512 GiB; 0x7000-0xafff four page directories of 2 MiB pages.
0xb000-  boot stack; every protocol starts with RSP = ``BOOT_STACK_TOP`` = 0x10000.
0x10000
======== ==================================================================================

The initrd (``--initrd``) goes where QEMU puts it: page-aligned at the top of RAM (Linux: below
``initrd_addr_max``; PVH and ELF64: below 4 GiB), or, for Multiboot, on the first page boundary
after the kernel image.
"""
