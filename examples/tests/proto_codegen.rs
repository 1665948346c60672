//! The gRPC code in `src/generated/` is generated from `proto/` and checked in, so building needs
//! no protobuf compiler. This test generates it again (protox, a pure-Rust `.proto` compiler, and
//! tonic-build) and fails if the checked-in files differ. After changing a `.proto`:
//!
//! ```sh
//! XATASTOR_REGENERATE_PROTO=1 cargo test -p xatastor-examples --test proto_codegen
//! ```

use std::path::Path;

#[test]
fn checked_in_grpc_code_matches_the_protos() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos = ["xatastor/admin/v1/admin.proto", "csi/v1/csi.proto"];
    let fds = protox::compile(protos, [root.join("proto")]).expect("the .proto files compile");
    let out = tempfile::tempdir().unwrap();
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        // Messages that carry DH-HMAC-CHAP secrets: their `Debug` (src/grpc.rs) leaves them out.
        .skip_debug(".xatastor.admin.v1.AllowHostRequest")
        .skip_debug(".xatastor.admin.v1.GenerateHostSecretResponse")
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("code generation");
    let regenerate = std::env::var_os("XATASTOR_REGENERATE_PROTO").is_some();
    let mut stale = Vec::new();
    for file in ["xatastor.admin.v1.rs", "csi.v1.rs"] {
        let fresh = std::fs::read_to_string(out.path().join(file)).expect("generated");
        let checked_in = root.join("src/generated").join(file);
        if regenerate {
            std::fs::write(&checked_in, &fresh).unwrap();
        } else if std::fs::read_to_string(&checked_in).ok().as_deref() != Some(fresh.as_str()) {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from what proto/ generates: run XATASTOR_REGENERATE_PROTO=1 cargo test -p \
         xatastor-examples --test proto_codegen"
    );
}
