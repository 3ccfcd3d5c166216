//! Shell completions and the man page, generated from the flag definitions.

mod harness;

use std::process::Command;

use harness::legate_bin;

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    let script = Command::new(legate_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legate.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    // Ask bash's completion function what it offers, as a shell would on TAB.
    // Bash calls the function with the command, the word being completed and the one before.
    let complete = |words: &str, cword: usize| {
        let list: Vec<&str> = words.split(' ').collect();
        let (cur, prev) = (list[cword], list[cword - 1]);
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; \
                 COMP_POINT=${{#COMP_LINE}}; _legate legate '{cur}' '{prev}'; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let subcommands = complete("legate se", 1);
    assert_eq!(subcommands.trim(), "server", "{subcommands}");
    let flags = complete("legate server --allow-", 2);
    for flag in [
        "--allow-all",
        "--allow-cn",
        "--allow-ou",
        "--allow-dns",
        "--allow-uri",
    ] {
        assert!(flags.lines().any(|l| l == flag), "{flag} missing: {flags}");
    }
}

#[test]
fn the_man_page_documents_the_subcommands() {
    let out = Command::new(legate_bin()).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH legate 1"),
        "{page}"
    );
    for sub in ["server", "client", "run", "gen\\-certs"] {
        assert!(page.contains(sub), "{sub} missing from the man page");
    }
}

/// `--help` groups the flags (process-wide ones apart from each tunnel's), says where
/// `unix:PATH` is accepted, and shows defaults as clap does.
#[test]
fn help_groups_its_flags() {
    for side in ["server", "client"] {
        let out = std::process::Command::new(harness::legate_bin())
            .args([side, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        let section = |heading: &str| -> String {
            let start = help
                .find(&format!("\n{heading}:\n"))
                .unwrap_or_else(|| panic!("{heading} in {help}"));
            let rest = &help[start + heading.len() + 3..];
            rest[..rest.find("\n\n").unwrap_or(rest.len())].to_string()
        };
        assert!(
            section("Addresses").contains("--listen") && section("Addresses").contains("unix:PATH")
        );
        assert!(section("Identity").contains("--cacert"));
        assert!(section("Access").contains(if side == "server" {
            "--allow-cn"
        } else {
            "--verify-cn"
        }));
        assert!(section("Timeouts and limits").contains("--connect-timeout <DURATION>"));
        assert!(section("Timeouts and limits").contains("[default: 10s]"));
        let process = section("Process (every tunnel)");
        assert!(
            process.contains("--shutdown-timeout") && process.contains("--threads"),
            "{process}"
        );
        assert!(!section("Addresses").contains("--shutdown-timeout"));
        assert!(section("Logging").contains("--log-format"));
    }
}
