//! Small helpers every layer shares, each in one place: the FNV-1a hash, the softmax family,
//! the words of a text and where the shipped files live ([`Paths`]).
//!
//! The bottom layer with `error`: it imports nothing else from the crate.

/// FNV-1a (64-bit) of `bytes`: stable across platforms and releases (unlike `std`'s hasher),
/// because what it decides is stored: the dev/train split of the data, the gate's n-gram
/// buckets, the keys of the gate's feature cache.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Lower-cased words (letters, digits, apostrophes inside words): what the gate's n-grams and
/// the data checks' similarity count.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Where the shipped files live (the adapters, the gate and its policies, under `root`) and where
/// fetched models are kept. The library has no such place of its own: the caller says (the
/// binary and the tests pass the repository they were built in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The repository root: `adapters/`, `router-data/`.
    pub root: std::path::PathBuf,
    /// The models cache: `$STANCEMIX_MODELS` when set, else `ROOT/models`.
    pub models: std::path::PathBuf,
}

impl Paths {
    /// The layout of a repository at `root`, the models cache overridden by `$STANCEMIX_MODELS`.
    pub fn at(root: impl Into<std::path::PathBuf>) -> Paths {
        let root = root.into();
        let models = match std::env::var_os("STANCEMIX_MODELS") {
            Some(dir) if !dir.is_empty() => std::path::PathBuf::from(dir),
            _ => root.join("models"),
        };
        Paths { root, models }
    }
}

/// The floats the softmax family works in: `f32` logits, `f64` sums of log-probabilities.
pub trait Float:
    Copy
    + std::iter::Sum
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
{
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn max(self, other: Self) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
float!(f32);
float!(f64);

/// The largest of `z` (`-inf` when empty).
fn max<T: Float>(z: &[T]) -> T {
    z.iter().fold(T::NEG_INFINITY, |a, &v| a.max(v))
}

/// `log sum_i exp(z_i)`, the maximum subtracted first so that large logits do not overflow.
pub fn log_sum_exp<T: Float>(z: &[T]) -> T {
    let m = max(z);
    m + z.iter().map(|&x| (x - m).exp()).sum::<T>().ln()
}

/// `exp(z_i) / sum_j exp(z_j)`, the maximum subtracted first.
pub fn softmax<T: Float>(z: &[T]) -> Vec<T> {
    softmax_and_log_sum_exp(z).0
}

/// `z_i - log sum_j exp(z_j)`: log-probabilities from logits.
pub fn log_softmax<T: Float>(z: &[T]) -> Vec<T> {
    let lse = log_sum_exp(z);
    z.iter().map(|&x| x - lse).collect()
}

/// [`softmax`] and [`log_sum_exp`] of `z` from one pass of `exp`.
pub fn softmax_and_log_sum_exp<T: Float>(z: &[T]) -> (Vec<T>, T) {
    let m = max(z);
    let e: Vec<T> = z.iter().map(|&x| (x - m).exp()).collect();
    let s: T = e.iter().copied().sum();
    (e.into_iter().map(|x| x / s).collect(), m + s.ln())
}

/// The files in `dir` whose extension is `ext` (no dot), sorted by path.
pub fn files_with_extension(
    dir: &std::path::Path,
    ext: &str,
) -> crate::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference (isthe.com/chongo/tech/comp/fnv): offset basis, "a", "foobar".
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn softmax_family_agrees_with_the_definitions_in_f64() {
        let z = [1.5f32, -3.0, 0.25, 80.0];
        let exact: f64 = z.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&z) as f64 - exact).abs() < 1e-4);
        let p = softmax(&z);
        let lp = log_softmax(&z);
        for i in 0..z.len() {
            let want = (z[i] as f64 - exact).exp();
            assert!((p[i] as f64 - want).abs() < 1e-6, "{i}");
            assert!((lp[i] as f64 - (z[i] as f64 - exact)).abs() < 1e-4, "{i}");
        }
        let (p2, lse) = softmax_and_log_sum_exp(&[0.2f64.ln(), 0.3f64.ln()]);
        assert!((lse - 0.5f64.ln()).abs() < 1e-12);
        assert!((p2[0] - 0.4).abs() < 1e-12 && (p2[1] - 0.6).abs() < 1e-12);
    }
}
