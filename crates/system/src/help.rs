//! What the program prints and exits on: `-version`, `-h`, and the probes test harnesses
//! make (`-machine help`, `-device help`, `-drive format=help`).

use crate::devices::MODELS;
use crate::machine::MACHINES;
use ferrite_storage_daemon::front_end::{QEMU_VERSION, package};

/// The version as QEMU words it after "version": `10.0.2 (package)`.
pub(crate) fn version() -> String {
    let pkg = package();
    if pkg.is_empty() {
        qemu_version()
    } else {
        format!("{} ({pkg})", qemu_version())
    }
}

/// The QEMU version alone (the human monitor's banner names no package).
pub(crate) fn qemu_version() -> String {
    let (major, minor, micro) = QEMU_VERSION;
    format!("{major}.{minor}.{micro}")
}

/// `-version`.
pub(crate) fn version_text() -> String {
    format!(
        "QEMU emulator version {}\n\
         Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n",
        version()
    )
}

/// `-h`.
pub(crate) fn help_text(prog: &str) -> String {
    format!(
        "usage: {prog} [options] [disk_image]\n\n\
         'disk_image' is a raw hard disk image for IDE hard disk 0\n\n\
         A qemu-system command line for QEMU's block layer, served by ferrite: the machine\n\
         is a board of device stand-ins without a guest CPU.\n\n\
         Standard options:\n\
         -h or -help     display this help and exit\n\
         -version        display version information and exit\n\
         -machine [type=]name[,prop[=value][,...]]  selects the machine ('-machine help' lists them)\n\
         -accel qtest|kvm|tcg  the accelerator (without a guest CPU, qtest is what runs)\n\
         -nodefaults     don't create default devices\n\
         -S              freeze CPU at startup (use 'c' or 'cont' to start)\n\
         -name string    the guest's name\n\
         -uuid %08x-%04x-%04x-%04x-%012x  the guest's UUID\n\n\
         Block device options:\n\
         -drive [file=file][,if=type][,id=name][,format=f][,node-name=n][,cache=c][,aio=a]\n\
         \x20      [,readonly=on|off][,media=disk|cdrom][,werror=w][,rerror=r]...\n\
         -blockdev [driver=]driver[,node-name=N][,discard=ignore|unmap]...\n\
         -device driver[,prop[=value][,...]]  a device ('-device help' lists them)\n\
         -iscsi [user=user][,password=password][,password-secret=secret]\n\
         \x20      [,header-digest=CRC32C|CRC32C-NONE|NONE-CRC32C|NONE][,initiator-name=iqn]\n\
         \x20      [,id=target-iqn][,timeout=timeout]  defaults for iscsi:// names\n\n\
         Monitors and character devices:\n\
         -chardev backend,id=id[,...]\n\
         -mon [chardev=]name[,mode=readline|control][,pretty[=on|off]]\n\
         -qmp dev        like -mon chardev=...,mode=control on a chardev made from 'dev'\n\
         -qtest dev      the qtest protocol on 'dev' (chardev:ID)\n\
         -object type,id=id[,...]\n"
    )
}

/// `-machine help`.
pub(crate) fn machine_help() -> String {
    let mut out = String::from("Supported machines are:\n");
    for m in MACHINES {
        out += &format!("{:<20} {}\n", m.name, m.desc);
    }
    out
}

/// `-device help`: the device models by category, as qemu-system lists them.
pub(crate) fn device_help() -> String {
    let mut out = String::new();
    for category in ["Controller/Bridge/Hub devices", "Storage devices"] {
        out += &format!("{category}:\n");
        let mut models: Vec<_> = MODELS.iter().filter(|m| m.category == category).collect();
        models.sort_by_key(|m| m.name);
        for m in models {
            out += &format!("name \"{}\", bus {}", m.name, m.bus);
            if let Some(alias) = m.alias {
                out += &format!(", alias \"{alias}\"");
            }
            if !m.desc.is_empty() {
                out += &format!(", desc \"{}\"", m.desc);
            }
            out += "\n";
        }
        out += "\n";
    }
    out
}
