//! The texts of `--help` and `--version`.

/// The QEMU release whose interface ferrite implements.
pub const QEMU_VERSION: (i64, i64, i64) = (10, 0, 2);

/// The package string in `query-version` and the greeting.
pub fn package() -> String {
    format!("ferrite {}", env!("CARGO_PKG_VERSION"))
}

pub(crate) fn version_text(prog: &str) -> String {
    let (ma, mi, mc) = QEMU_VERSION;
    format!(
        "{prog} version {ma}.{mi}.{mc} ({})\nferrite is licensed MIT OR Apache-2.0; it implements the interface of qemu-storage-daemon {ma}.{mi}.\n",
        package()
    )
}

pub(crate) fn help_text(prog: &str) -> String {
    format!(
        "Usage: {prog} [options]
ferrite storage daemon (compatible with qemu-storage-daemon)

  -h, --help             print this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         enable diagnostic logging (patterns are tracing
                         filter directives such as 'ferrite_qmp=debug', or '*';
                         the FERRITE_LOG environment variable works too)
  -V, --version          print the version and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,...]
                         add a block node (keyval or JSON)
  --chardev <options>    add a character device backend:
                         socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
                         socket,id=<id>,host=<host>,port=<port>[,server=on|off]
                         socket,id=<id>,fd=<fd>[,server=on|off]
                         stdio,id=<id> | file,id=<id>,path=<path> | pipe,id=<id>,path=<path>
                         null,id=<id> | ringbuf,id=<id>[,size=<size>] | memory,...
  --daemonize            run in the background; the parent exits once start-up
                         has finished, with its status
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on|off]
                         export a block node over NBD (needs --nbd-server)
  --export [type=]fuse,id=<id>,node-name=<node>,mountpoint=<file>[,growable=on|off]
           [,writable=on|off][,allow-other=on|off|auto]
                         export a block node as a regular file (FUSE)
  --export [type=]vhost-user-blk,id=<id>,node-name=<node>,addr.type=unix,
           addr.path=<socket>[,writable=on|off][,num-queues=<n>]
                         export a block node to a VM (vhost-user-blk)
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         serve QMP on a character device
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]
               [,tls-creds=<id>][,tls-authz=<id>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                         start the NBD server
  --object help          list the object types that can be added
  --object <type>,help   list the properties of an object type
  --object <type>,id=<id>[,<prop>=<value>...]
                         add an object (throttle-group, secret, secret_keyring,
                         iothread, main-loop, tls-creds-x509, tls-creds-psk,
                         tls-creds-anon, authz-simple, authz-list)
  --pidfile <path>       write the process id to <path> once start-up is done

Options are processed in the order given, so define a thing before using it.
"
    )
}
