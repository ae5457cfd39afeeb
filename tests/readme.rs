//! The policies the README shows are valid: each YAML block is checked as
//! `breakwater config check` would, with the Secret files it names made in
//! a temporary directory.

use std::path::Path;

#[test]
fn every_policy_in_the_readme_is_valid() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut blocks = 0;
    for block in readme.split("```yaml\n").skip(1) {
        let yaml = block.split("```").next().unwrap();
        // Secrets as Kubernetes mounts them: a file under /var/run/secrets.
        let yaml = yaml.replace("/var/run/secrets/", &format!("{}/", dir.path().display()));
        for line in yaml.lines() {
            if let Some(path) = line.split("from_file: ").nth(1) {
                let path = Path::new(path.split('}').next().unwrap().trim());
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, "Bearer sk-test\n").unwrap();
            }
        }
        if let Err(error) = breakwater::config::parse("README.md", &yaml) {
            panic!("a README policy is invalid:\n{error}\n{yaml}");
        }
        blocks += 1;
    }
    assert!(blocks >= 2, "found {blocks} YAML blocks in the README");
}
