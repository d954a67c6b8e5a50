//! A real OpenLDAP `slapd` on an ephemeral loopback port, with a small
//! directory (`dc=example,dc=com`, admin and two users).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{Proc, free_port, wait_port};

pub const SUFFIX: &str = "dc=example,dc=com";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
pub const ADMIN_PW: &str = "admin-secret";
pub const USERS: &[&str] = &["alice", "bob"];

pub fn slapd_path() -> String {
    for p in ["/usr/sbin/slapd", "/usr/local/sbin/slapd"] {
        if Path::new(p).exists() {
            return p.to_string();
        }
    }
    "slapd".into()
}

pub struct Slapd {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Slapd {
    /// A `slapd` on a free loopback port.
    pub fn start(dir: &Path) -> Slapd {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_with(dir, addr, Command::new(slapd_path()))
    }

    /// A `slapd` listening on `addr`, run by `cmd` (the `slapd` binary,
    /// perhaps behind a wrapper such as `ip netns exec`).
    pub fn start_with(dir: &Path, addr: SocketAddr, mut cmd: Command) -> Slapd {
        let root = dir.join("slapd");
        let db = root.join("db");
        std::fs::create_dir_all(&db).unwrap();
        let conf = root.join("slapd.conf");
        std::fs::write(
            &conf,
            format!(
                "include /etc/ldap/schema/core.schema\n\
                 include /etc/ldap/schema/cosine.schema\n\
                 include /etc/ldap/schema/inetorgperson.schema\n\
                 modulepath /usr/lib/ldap\n\
                 moduleload back_mdb\n\
                 pidfile {root}/slapd.pid\n\
                 database mdb\n\
                 maxsize 67108864\n\
                 suffix \"{SUFFIX}\"\n\
                 rootdn \"{ADMIN_DN}\"\n\
                 rootpw {ADMIN_PW}\n\
                 directory {db}\n",
                root = root.display(),
                db = db.display()
            ),
        )
        .unwrap();
        let mut ldif = format!(
            "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
             dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n"
        );
        for u in USERS {
            ldif += &format!(
                "dn: uid={u},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: {u}\ncn: {u}\nsn: {u}\n\
                 mail: {u}@example.com\nuserPassword: {u}-pw\n\n"
            );
        }
        let ldif_file = root.join("base.ldif");
        std::fs::write(&ldif_file, ldif).unwrap();
        let out = Command::new(slapd_path().replace("slapd", "slapadd"))
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(&ldif_file)
            .output()
            .expect("run slapadd (apt-get install slapd)");
        assert!(
            out.status.success(),
            "slapadd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cmd.arg("-f")
            .arg(&conf)
            .arg("-h")
            .arg(format!("ldap://{addr}/"))
            .args(["-d", "0"]);
        let proc = Proc::spawn("slapd", cmd, dir);
        assert!(
            wait_port(addr, Duration::from_secs(15)),
            "slapd did not listen on {addr}: {}",
            proc.log_text()
        );
        Slapd { proc, addr }
    }
}

/// Run an OpenLDAP client tool; returns (exit code, stdout, stderr).
pub fn ldap_tool(tool: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tool)
        .args(args)
        .env("LDAPTLS_REQCERT", "never")
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `ldapsearch` output without the lines that differ between two servers
/// reached at different addresses (none, for a plain search) and without
/// comments, so results through the tunnel and direct can be compared.
pub fn search(addr: SocketAddr, filter: &str) -> (i32, String) {
    let url = format!("ldap://{addr}");
    let (code, out, err) = ldap_tool(
        "ldapsearch",
        &[
            "-x", "-LLL", "-H", &url, "-D", ADMIN_DN, "-w", ADMIN_PW, "-b", SUFFIX, filter,
        ],
    );
    (code, format!("{out}{err}"))
}

/// `ldapwhoami` as the admin with `password`; returns (exit code, stdout, stderr).
pub fn whoami(addr: SocketAddr, password: &str) -> (i32, String, String) {
    let url = format!("ldap://{addr}");
    ldap_tool(
        "ldapwhoami",
        &["-x", "-H", &url, "-D", ADMIN_DN, "-w", password],
    )
}
