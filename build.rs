//! The demo page in `static/` is embedded in the binary (`include_dir!` in
//! `src/net/static_files.rs`), which cargo cannot see on its own: this tells it to
//! rebuild when a file there changes.

fn main() {
    println!("cargo:rerun-if-changed=static");
}
