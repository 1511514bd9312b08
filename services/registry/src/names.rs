//! Names and references: model names, alias names, artifact paths, and model refs
//! (`name@alias`, `name/3`, `name@latest`, bare `name` = latest).

use crate::error::{RegistryError, Result};

/// Longest model name.
pub const MAX_MODEL_NAME: usize = 128;

/// Checks a model name: 1-128 chars of lowercase letters, digits and `-_./`, starting with a
/// letter or digit (so `/3` suffixes and paths stay unambiguous), no `..`.
pub fn validate_model_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(RegistryError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_MODEL_NAME {
        return Err(RegistryError::invalid(
            field,
            format!(
                "must be at most {MAX_MODEL_NAME} characters, got {}",
                name.len()
            ),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_./".contains(*c)))
    {
        return Err(RegistryError::invalid(
            field,
            format!("`{name}` contains `{bad}`: use lowercase letters, digits and -_./"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || name.ends_with('/') {
        return Err(RegistryError::invalid(
            field,
            format!("`{name}` must start with a letter or digit and not end with `/`"),
        ));
    }
    if name.contains("..") || name.contains("//") {
        return Err(RegistryError::invalid(
            field,
            format!("`{name}` contains `..` or `//`"),
        ));
    }
    // `name/3` is a version reference: a name must not end in `/<digits>`.
    if let Some((_, tail)) = name.rsplit_once('/')
        && tail.chars().all(|c| c.is_ascii_digit())
    {
        return Err(RegistryError::invalid(
            field,
            format!("`{name}` ends in `/<number>`, which reads as a version reference"),
        ));
    }
    Ok(())
}

/// Checks an alias name: 1-64 chars of lowercase letters, digits, `-` and `_`, not `latest`.
pub fn validate_alias(field: &'static str, alias: &str) -> Result<()> {
    if alias.is_empty() || alias.len() > 64 {
        return Err(RegistryError::invalid(field, "must be 1-64 characters"));
    }
    if !alias
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        || !alias.starts_with(|c: char| c.is_ascii_lowercase())
    {
        return Err(RegistryError::invalid(
            field,
            format!("`{alias}` must start with a letter and use only a-z, 0-9, - and _"),
        ));
    }
    if alias == "latest" {
        return Err(RegistryError::invalid(
            field,
            "`latest` is reserved: it always means the newest READY version",
        ));
    }
    Ok(())
}

/// Checks a file path inside a version: relative, `/`-separated, no `.`/`..` segments.
pub fn validate_artifact_path(field: &'static str, path: &str) -> Result<()> {
    if path.is_empty() || path.len() > 512 {
        return Err(RegistryError::invalid(field, "must be 1-512 characters"));
    }
    if path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err(RegistryError::invalid(
            field,
            format!("`{path}` must be a relative path with `/` separators"),
        ));
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(RegistryError::invalid(
            field,
            format!("`{path}` has an empty, `.` or `..` segment"),
        ));
    }
    Ok(())
}

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// `name/3`.
    Version(String, u32),
    /// `name@production`.
    Alias(String, String),
    /// `name@latest` or bare `name`: the newest READY version.
    Latest(String),
}

impl ModelRef {
    /// The model name of the reference.
    pub fn model(&self) -> &str {
        match self {
            Self::Version(name, _) | Self::Alias(name, _) | Self::Latest(name) => name,
        }
    }
}

/// Parses `name@alias`, `name/3`, `name@latest` or `name`.
pub fn parse_model_ref(field: &'static str, reference: &str) -> Result<ModelRef> {
    let reference = reference.trim();
    if let Some((name, alias)) = reference.rsplit_once('@') {
        validate_model_name(field, name)?;
        if alias == "latest" {
            return Ok(ModelRef::Latest(name.to_owned()));
        }
        validate_alias(field, alias)?;
        return Ok(ModelRef::Alias(name.to_owned(), alias.to_owned()));
    }
    if let Some((name, number)) = reference.rsplit_once('/')
        && !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit())
    {
        validate_model_name(field, name)?;
        let version: u32 = number.parse().map_err(|_| {
            RegistryError::invalid(field, format!("version `{number}` is too large"))
        })?;
        if version == 0 {
            return Err(RegistryError::invalid(field, "versions start at 1"));
        }
        return Ok(ModelRef::Version(name.to_owned(), version));
    }
    validate_model_name(field, reference)?;
    Ok(ModelRef::Latest(reference.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        for good in [
            "llama",
            "acme/bank-adviser",
            "qwen2.5_0.5b",
            "a",
            &"x".repeat(128),
        ] {
            assert!(validate_model_name("name", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Llama",
            "a b",
            "/abs",
            "a/",
            "a/../b",
            "a//b",
            "a/3",
            "-x",
            &"x".repeat(129),
            "模型",
        ] {
            let error = validate_model_name("name", bad).expect_err(bad);
            assert!(error.to_string().starts_with("name: "), "{error}");
        }
    }

    #[test]
    fn refs() {
        assert_eq!(
            parse_model_ref("model_ref", "acme/bank@production").ok(),
            Some(ModelRef::Alias("acme/bank".into(), "production".into()))
        );
        assert_eq!(
            parse_model_ref("model_ref", "acme/bank/12").ok(),
            Some(ModelRef::Version("acme/bank".into(), 12))
        );
        assert_eq!(
            parse_model_ref("model_ref", "bank@latest").ok(),
            Some(ModelRef::Latest("bank".into()))
        );
        assert_eq!(
            parse_model_ref("model_ref", "bank").ok(),
            Some(ModelRef::Latest("bank".into()))
        );
        assert!(parse_model_ref("model_ref", "bank/0").is_err());
        assert!(parse_model_ref("model_ref", "bank@Prod").is_err());
        assert!(parse_model_ref("model_ref", "@prod").is_err());
    }

    #[test]
    fn artifact_paths() {
        assert!(validate_artifact_path("path", "model.safetensors").is_ok());
        assert!(validate_artifact_path("path", "onnx/model.onnx").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/./b", "a//b", "a\\b"] {
            assert!(validate_artifact_path("path", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aliases() {
        assert!(validate_alias("alias", "production").is_ok());
        assert!(validate_alias("alias", "canary-2").is_ok());
        for bad in ["", "latest", "Prod", "2x", "a b"] {
            assert!(validate_alias("alias", bad).is_err(), "{bad}");
        }
    }
}
