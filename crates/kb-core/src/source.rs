//! Where a model comes from: a local folder, or a Hugging Face hub id resolved through `hf-hub`
//! into the standard cache (`HF_HOME` honoured, so a cache filled by Python is reused).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::weights::WEIGHT_FILE_NAMES;

/// The model transformers users fine-tune for Korean keywords.
pub const DEFAULT_MODEL: &str = "gogamza/kobart-base-v1";

/// Files a model folder must provide (besides weights).
pub const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files a model folder may provide.
pub const OPTIONAL_FILES: [&str; 3] = [
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// A model argument as the user wrote it (`--model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder on disk.
    Local(PathBuf),
    /// A hub repository id, optionally at a revision (`org/name@rev`).
    Hub {
        /// `org/name`.
        repo: String,
        /// Branch, tag or commit (default `main`).
        revision: String,
    },
}

impl ModelSource {
    /// Interprets `spec`: an existing path (or one that starts with `.`, `/` or `~`) is a folder,
    /// anything else a hub id.
    pub fn parse(spec: &str) -> Self {
        let path = Path::new(spec);
        let looks_local = spec.starts_with('.')
            || spec.starts_with('/')
            || spec.starts_with('~')
            || spec.contains('\\')
            || spec.split('/').count() > 2;
        if path.exists() || looks_local {
            return ModelSource::Local(path.to_path_buf());
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r.to_string(), rev.to_string()),
            None => (spec.to_string(), "main".to_string()),
        };
        ModelSource::Hub { repo, revision }
    }

    /// Resolves the source to a folder holding `config.json`, `tokenizer.json` and weights.
    ///
    /// Hub ids are looked up in the local cache first; files missing there are downloaded
    /// unless `HF_HUB_OFFLINE=1`. Failures explain how to provide a local folder instead.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            ModelSource::Local(dir) => {
                check_folder(dir)?;
                Ok(dir.clone())
            }
            ModelSource::Hub { repo, revision } => resolve_hub(repo, revision),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Local(p) => write!(f, "{}", p.display()),
            ModelSource::Hub { repo, revision } if revision == "main" => write!(f, "{repo}"),
            ModelSource::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

fn check_folder(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::ModelSource(format!(
            "{} is not a folder (a model folder holds config.json, tokenizer.json and model.safetensors or pytorch_model.bin)",
            dir.display()
        )));
    }
    let missing: Vec<&str> = REQUIRED_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(Error::ModelSource(format!(
            "{} lacks {}",
            dir.display(),
            missing.join(" and ")
        )));
    }
    if !WEIGHT_FILE_NAMES.iter().any(|f| dir.join(f).is_file()) {
        return Err(Error::ModelSource(format!(
            "{} has no weights: expected one of {}",
            dir.display(),
            WEIGHT_FILE_NAMES.join(", ")
        )));
    }
    Ok(())
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

fn how_to_fix(repo: &str, cache: &Path) -> String {
    format!(
        "To run without the hub, pass --model /path/to/folder (a folder with config.json, tokenizer.json and model.safetensors or pytorch_model.bin, e.g. from `huggingface-cli download {repo} --local-dir DIR` on a machine with internet), or fill the cache at {} (HF_HOME).",
        cache.display()
    )
}

fn resolve_hub(repo: &str, revision: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let hub_repo = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let cached = cache.repo(hub_repo.clone());

    // 1. Everything already in the cache: no network at all.
    if let Some(dir) = cached_snapshot(&cached) {
        return Ok(dir);
    }
    if offline() {
        let have: Vec<&str> = REQUIRED_FILES
            .iter()
            .chain(WEIGHT_FILE_NAMES.iter())
            .copied()
            .filter(|f| cached.get(f).is_some())
            .collect();
        return Err(Error::ModelSource(format!(
            "{repo}@{revision} is not fully in the Hugging Face cache and HF_HUB_OFFLINE is set (cached: {}; needed: config.json, tokenizer.json and weights). {}",
            if have.is_empty() { "nothing".to_string() } else { have.join(", ") },
            how_to_fix(repo, cache.path())
        )));
    }

    // 2. Download what is missing.
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| Error::ModelSource(format!("cannot start the hub client: {e}")))?;
    let remote = api.repo(hub_repo);
    let fetch = |name: &str| remote.get(name);
    let mut dir = None;
    for f in REQUIRED_FILES {
        let path = fetch(f).map_err(|e| {
            Error::ModelSource(format!(
                "cannot get {f} of {repo}@{revision} from the Hugging Face hub ({e}). {}",
                how_to_fix(repo, cache.path())
            ))
        })?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for f in OPTIONAL_FILES {
        let _ = fetch(f); // absent optional files are fine
    }
    let mut weights_err = None;
    for f in WEIGHT_FILE_NAMES {
        match fetch(f) {
            Ok(path) => {
                if f.ends_with(".index.json") {
                    download_shards(&path, &fetch)?;
                }
                weights_err = None;
                break;
            }
            Err(e) => weights_err = Some(e),
        }
    }
    if let Some(e) = weights_err {
        return Err(Error::ModelSource(format!(
            "{repo}@{revision} provides none of {} ({e}). {}",
            WEIGHT_FILE_NAMES.join(", "),
            how_to_fix(repo, cache.path())
        )));
    }
    let dir = dir.ok_or_else(|| Error::ModelSource(format!("{repo}: empty download")))?;
    check_folder(&dir)?;
    Ok(dir)
}

fn download_shards<F>(index: &Path, fetch: &F) -> Result<()>
where
    F: Fn(&str) -> std::result::Result<PathBuf, hf_hub::api::sync::ApiError>,
{
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Weights(format!("{}: {e}", index.display())))?;
    let mut shards: Vec<String> = v["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    for s in shards {
        fetch(&s).map_err(|e| Error::ModelSource(format!("cannot download shard {s}: {e}")))?;
    }
    Ok(())
}

/// The snapshot folder of a cached repo, if it holds everything needed.
fn cached_snapshot(cached: &hf_hub::CacheRepo) -> Option<PathBuf> {
    let config = cached.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    check_folder(&dir).ok()?;
    Some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_distinguishes_paths_and_hub_ids() {
        assert_eq!(
            ModelSource::parse("gogamza/kobart-base-v1"),
            ModelSource::Hub {
                repo: "gogamza/kobart-base-v1".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSource::parse("gogamza/kobart-base-v1@abc"),
            ModelSource::Hub {
                repo: "gogamza/kobart-base-v1".into(),
                revision: "abc".into()
            }
        );
        assert_eq!(
            ModelSource::parse("./runs/model"),
            ModelSource::Local(PathBuf::from("./runs/model"))
        );
        assert_eq!(
            ModelSource::parse("/abs/model"),
            ModelSource::Local(PathBuf::from("/abs/model"))
        );
    }

    #[test]
    fn local_folder_errors_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelSource::Local(dir.path().to_path_buf())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("tokenizer.json"),
            "{err}"
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        let err = ModelSource::Local(dir.path().to_path_buf())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no weights") && err.contains("pytorch_model.bin"),
            "{err}"
        );
    }
}
