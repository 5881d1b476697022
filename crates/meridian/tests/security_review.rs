//! Security review findings proven without a broker: `meridian tokens` and its key files.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// `create-secret-key --output` over an existing, world-readable file left the secret key
/// readable by everyone (the owner-only mode applied only to a file the command created);
/// the same for a key pair's private key.
#[test]
fn key_files_are_private_even_when_they_existed() {
    let directory = tempfile::tempdir().expect("tempdir");
    let secret = directory.path().join("secret.key");
    let private = directory.path().join("private.key");
    let public = directory.path().join("public.key");
    for path in [&secret, &private] {
        std::fs::write(path, "placeholder").expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(args)
            .output()
            .expect("run meridian");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let path = |path: &std::path::Path| path.to_str().expect("path").to_string();
    run(&["tokens", "create-secret-key", "--output", &path(&secret)]);
    run(&[
        "tokens",
        "create-key-pair",
        "--signature-algorithm",
        "ES256",
        "--output-private-key",
        &path(&private),
        "--output-public-key",
        &path(&public),
    ]);
    for key in [&secret, &private] {
        let mode = std::fs::metadata(key)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
    }
    assert_eq!(std::fs::read(&secret).expect("read").len(), 32);
}
