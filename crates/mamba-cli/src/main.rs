fn main() {
    let _ = clap::Command::new("x");
}
