//! Running the `mamba` binary and checking its output, shared by the CLI tests.
#![allow(dead_code)] // each test file uses its own subset

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the binary with backtraces enabled, so that tests see that errors stay one line
/// even then.
pub fn mamba(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mamba"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("cannot run the mamba binary")
}

pub fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "mamba failed ({}): {}",
        out.status,
        stderr(out)
    );
}

/// The last stdout line of a successful run, parsed as JSON.
pub fn json_output(out: &Output) -> Value {
    assert_success(out);
    let text = stdout(out);
    let last = text.lines().last().expect("no output on stdout");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{last:?} is not JSON: {e}"))
}

/// A failure as the CLI promises it: exit code 1 and one `error:` line on stderr, no panic.
pub fn assert_clean_failure(out: &Output, what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what}: stderr {err:?}");
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{what}: {err:?}");
}

/// A failing run whose error line mentions `needle`.
pub fn assert_fails_with(args: &[&str], needle: &str) {
    let out = mamba(args);
    let what = args.join(" ");
    assert_clean_failure(&out, &what);
    assert!(
        stderr(&out).contains(needle),
        "{what}: error does not mention {needle:?}: {}",
        stderr(&out)
    );
}

/// `mamba init` of the config.json text `config` into `dir/model` (the config written as
/// `dir/config.json`): a fresh model with random weights.
pub fn init_model(dir: &Path, config: &str) -> PathBuf {
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config).unwrap();
    let model = dir.join("model");
    assert_success(&mamba(&[
        "init",
        "--config",
        path_arg(&config_path),
        "--out",
        path_arg(&model),
    ]));
    model
}
