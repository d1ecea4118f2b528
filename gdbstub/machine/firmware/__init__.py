"""What a PC's firmware leaves in memory for a kernel: ACPI and MP tables, BDA/EBDA, BIOS stubs."""
