//! The `gpu-mnist` binary: parse the command line, run the subcommand, map errors to exit codes
//! (0 success, 1 runtime failure, 2 bad usage). Errors are one line on stderr, never a panic.

mod cli;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".to_string());
        let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
        eprintln!("error: internal failure: {msg} (please report this as a bug)");
    }));
    quiet_display_probing();
    restore_sigpipe();
    let (args, matches) = match cli::parse() {
        Ok(parsed) => parsed,
        Err(e) => cli::exit_with_usage_error(e),
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cli::run(args, &matches))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            std::process::exit(e.exit_code());
        }
        Err(_) => std::process::exit(1),
    }
}

/// Vulkan drivers probe for a Wayland display and print "XDG_RUNTIME_DIR is invalid" when the
/// variable is unset (headless machines, CI). We never use a display: point it at the temporary
/// folder so that the probe fails quietly. Runs before any thread exists.
fn quiet_display_probing() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// Rust ignores SIGPIPE, so writing to a closed pipe (`gpu-mnist ... | head -1`) would fail with an
/// error; restore the default, as command-line tools expect: the process ends quietly.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
