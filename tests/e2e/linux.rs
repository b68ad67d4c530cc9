//! The Linux boot path: a Debian kernel, booted by our loader. On PVM it runs under the
//! instruction emulator (a stock kernel registers no VIF area), so only its early log is
//! checked: it must show our exact command line, our memory map and our ACPI tables.
use std::path::PathBuf;
use std::time::Duration;

use ray_e2e::Env;

/// The kernel `scripts/fetch-linux` extracts from Debian's cloud kernel package.
fn debian_vmlinux() -> PathBuf {
    if let Some(p) = std::env::var_os("RAY_LINUX_VMLINUX") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux/vmlinux");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-linux (scripts/test does) to download Debian's cloud kernel",
        p.display()
    );
    p
}

#[test]
fn debian_kernel_early_log_shows_our_cmdline_memory_map_and_tables() {
    let env = Env::new("linux");
    let kernel = debian_vmlinux();
    let cmdline = "earlyprintk=serial,ttyS0,115200 console=ttyS0 noxsave nokaslr rayvisor.e2e=linux-early-boot";
    let kernel_arg = kernel.display().to_string();
    let mut vm = env.boot(&[
        "--kernel",
        &kernel_arg,
        "--cmdline",
        cmdline,
        "--memory",
        "128M",
        "--vcpus",
        "2",
    ]);
    let slow = Duration::from_secs(600);
    let line = vm.expect_kernel_line("Command line: ", slow);
    assert_eq!(line, format!("Command line: {cmdline}"));
    let expected_e820 = [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
        // The PCI ECAM window: Linux takes the MCFG's window only if it is reserved.
        "BIOS-e820: [mem 0x00000000fe000000-0x00000000fe0fffff] reserved",
    ];
    for want in expected_e820 {
        let got = vm.expect_kernel_line("BIOS-e820: ", slow);
        assert_eq!(got, want);
    }
    let rsdp = vm.expect_kernel_line("ACPI: RSDP 0x00000000000E0000", slow);
    eprintln!("{rsdp}");
    vm.expect_kernel_line("ACPI: XSDT ", slow);
    vm.expect_kernel_line("ACPI: FACP ", slow);
    vm.expect_kernel_line("ACPI: DSDT ", slow);
    let madt = vm.expect_kernel_line("ACPI: APIC ", slow);
    eprintln!("{madt}");
    let mcfg = vm.expect_kernel_line("ACPI: MCFG 0x00000000000E0380 00003C ", slow);
    eprintln!("{mcfg}");
}

#[test]
fn debian_kernel_reads_our_srat_and_slit() {
    let env = Env::new("linux-numa");
    let kernel = debian_vmlinux().display().to_string();
    let mut vm = env.boot(&[
        "--kernel",
        &kernel,
        "--cmdline",
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 noxsave nokaslr",
        "--numa",
        "node=0,cpus=0,memory=64M",
        "--numa",
        "node=1,cpus=1,memory=64M",
    ]);
    let slow = Duration::from_secs(600);
    for table in [
        "ACPI: SRAT 0x00000000000E1000",
        "ACPI: SLIT 0x00000000000E3000",
    ] {
        eprintln!("{}", vm.expect_kernel_line(table, slow));
    }
    for want in [
        "SRAT: PXM 0 -> APIC 0x00 -> Node 0",
        "SRAT: PXM 1 -> APIC 0x01 -> Node 1",
        "ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x03ffffff]",
        "ACPI: SRAT: Node 1 PXM 1 [mem 0x04000000-0x07ffffff]",
    ] {
        assert_eq!(vm.expect_kernel_line(want, slow), want);
    }
}
