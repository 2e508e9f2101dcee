//! The embed handler: a real model. It serves sentence-transformers' all-MiniLM-L6-v2, a
//! 6-layer BERT that maps text to 384-dimensional unit vectors, on the CPU, with candle's BERT
//! and the Hugging Face `tokenizers` crate (pure Rust: no Python, no C libraries).
//!
//! `init` loads the model from `{"model_dir": "..."}` (`model.safetensors`, `config.json`,
//! `tokenizer.json`; `sample-handlers/embed/fetch-model.sh` puts them in
//! `target/models/all-MiniLM-L6-v2`) and logs how long that took and how big the model is. A
//! job's input is `{"texts": ["...", ...]}` or `{"text": "..."}`; its output is
//! `{"embeddings": [[384 floats], ...]}`, one vector per text in order, computed as
//! sentence-transformers computes them: the last hidden states averaged over the real tokens
//! (the attention mask), then L2-normalised. The texts of one job run as one batch.
//!
//! A text longer than the model's sequence limit (256 tokens, from `sentence_bert_config.json`)
//! fails the job, naming the text: sentence-transformers cuts such a text silently, and an
//! embedding of half a document that nobody knows is half is a wrong answer.
//!
//! The crate is also an `rlib`, so [`Model`] can be called without the host (the bench does).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use handler_abi::{export_handler, Handler, HandlerError, Job, LogLevel};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// The handler configuration (`--handler-config`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The directory holding `model.safetensors`, `config.json` and `tokenizer.json`.
    pub model_dir: PathBuf,
    /// The most texts one job may hold (default [`DEFAULT_MAX_TEXTS`]): a batch's memory grows
    /// with it.
    #[serde(default = "default_max_texts")]
    pub max_texts: usize,
}

/// How many texts a job may hold unless the configuration says otherwise.
pub const DEFAULT_MAX_TEXTS: usize = 128;

fn default_max_texts() -> usize {
    DEFAULT_MAX_TEXTS
}

/// A job's input: one text or several, not both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The texts to embed, as one batch.
    pub texts: Option<Vec<String>>,
    /// A single text to embed.
    pub text: Option<String>,
}

/// A job's output.
#[derive(Debug, Serialize)]
pub struct Output {
    /// One unit vector per text, in the order of the input.
    pub embeddings: Vec<Vec<f32>>,
}

/// Why the model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A model file could not be read.
    #[error("cannot read {path}: {source} (run sample-handlers/embed/fetch-model.sh to fetch the model)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `config.json` is not a BERT configuration.
    #[error("{path} is not a BERT config.json: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// `tokenizer.json` is not a tokenizer the `tokenizers` crate reads.
    #[error("{path} is not a Hugging Face tokenizer.json: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The tokenizer's reason.
        message: String,
    },
    /// The weights do not load, or do not fit the configuration.
    #[error("the weights in {path} do not load as the BERT model config.json describes: {source}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// candle's reason.
        source: candle_core::Error,
    },
}

/// Why a batch could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The input held no text.
    #[error("no text to embed: give {{\"texts\": [\"...\", ...]}} or {{\"text\": \"...\"}}")]
    NoText,
    /// The input held both `text` and `texts`.
    #[error("give either \"text\" or \"texts\", not both")]
    Both,
    /// A text is empty or only whitespace.
    #[error("text {index} is empty")]
    EmptyText {
        /// Its place in the input, from 0.
        index: usize,
    },
    /// More texts than [`Config::max_texts`].
    #[error(
        "{count} texts in one job; at most {max} are allowed (max_texts in the handler config)"
    )]
    TooManyTexts {
        /// How many the job held.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A text has more tokens than the model reads.
    #[error("text {index} is {tokens} tokens long; the model reads at most {max} (split it)")]
    TooLong {
        /// Its place in the input, from 0.
        index: usize,
        /// Its length in tokens, with the two special tokens.
        tokens: usize,
        /// The model's limit.
        max: usize,
    },
    /// The tokenizer failed.
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
    /// The forward pass failed.
    #[error("the model failed: {0}")]
    Compute(#[from] candle_core::Error),
}

/// all-MiniLM-L6-v2, loaded: the network, its tokenizer and its limits.
pub struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
    max_tokens: usize,
    parameters: usize,
    weight_bytes: usize,
}

/// The sequence limit when `sentence_bert_config.json` names none (all-MiniLM-L6-v2's).
const DEFAULT_MAX_TOKENS: usize = 256;

impl Model {
    /// Loads the model from `dir`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| LoadError::Read { path, source })
        };
        let config_path = dir.join("config.json");
        let config: BertConfig =
            serde_json::from_slice(&read("config.json")?).map_err(|source| LoadError::Config {
                path: config_path,
                source,
            })?;

        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = read("tokenizer.json")?;
        let mut tokenizer =
            Tokenizer::from_bytes(&tokenizer_json).map_err(|error| LoadError::Tokenizer {
                path: tokenizer_path,
                message: error.to_string(),
            })?;
        // The file pads every text to 128 tokens and cuts it there; the batch is padded to its
        // longest text below, and over-long texts are refused rather than cut.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .expect("no truncation is always valid");

        // sentence-transformers reads its sequence limit from here; a directory without it gets
        // all-MiniLM-L6-v2's, never more than the position embeddings hold.
        let max_tokens = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
            .and_then(|value| value["max_seq_length"].as_u64())
            .map_or(DEFAULT_MAX_TOKENS, |n| n as usize)
            .min(config.max_position_embeddings);

        let weights_path = dir.join("model.safetensors");
        let weights = read("model.safetensors")?;
        let weights_error = |source| LoadError::Weights {
            path: weights_path.clone(),
            source,
        };
        let device = Device::Cpu;
        let tensors =
            candle_core::safetensors::load_buffer(&weights, &device).map_err(weights_error)?;
        let parameters = tensors.values().map(Tensor::elem_count).sum();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let bert = BertModel::load(vb, &config).map_err(weights_error)?;
        Ok(Self {
            bert,
            tokenizer,
            max_tokens,
            parameters,
            weight_bytes: weights.len(),
        })
    }

    /// The number of parameters in the weights file.
    pub fn parameters(&self) -> usize {
        self.parameters
    }

    /// The size of the weights file in bytes.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The most tokens a text may have, its two special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embeds `texts` as one batch: one unit vector per text, in order, and the number of
    /// tokens in the batch (padding included).
    pub fn embed(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, usize), EmbedError> {
        if texts.is_empty() {
            return Err(EmbedError::NoText);
        }
        if let Some(index) = texts.iter().position(|text| text.trim().is_empty()) {
            return Err(EmbedError::EmptyText { index });
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|error| EmbedError::Tokenize(error.to_string()))?;
        if let Some((index, encoding)) = encodings
            .iter()
            .enumerate()
            .find(|(_, encoding)| encoding.len() > self.max_tokens)
        {
            return Err(EmbedError::TooLong {
                index,
                tokens: encoding.len(),
                max: self.max_tokens,
            });
        }

        // Pad to the longest text; the mask keeps padding out of attention and of the mean.
        let length = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let batch = encodings.len();
        let mut ids = vec![0u32; batch * length];
        let mut mask = vec![0u32; batch * length];
        for (row, encoding) in encodings.iter().enumerate() {
            let start = row * length;
            ids[start..start + encoding.len()].copy_from_slice(encoding.get_ids());
            mask[start..start + encoding.len()].copy_from_slice(encoding.get_attention_mask());
        }
        let device = &self.bert.device;
        let ids = Tensor::from_vec(ids, (batch, length), device)?;
        let mask = Tensor::from_vec(mask, (batch, length), device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.bert.forward(&ids, &token_types, Some(&mask))?;

        // Mean pooling over the real tokens, then L2 normalisation, as sentence-transformers'
        // Pooling(mean) and Normalize modules do (with their epsilons).
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        let embeddings = mean.broadcast_div(&norms)?.to_vec2::<f32>()?;
        Ok((embeddings, batch * length))
    }
}

/// The handler: the model, shared by every job.
pub struct Embed {
    model: Model,
    max_texts: usize,
}

impl Handler for Embed {
    type Config = Config;
    type Input = Input;
    type Output = Output;

    fn init(config: Config) -> Result<Self, HandlerError> {
        let started = Instant::now();
        let model = Model::load(&config.model_dir)
            .map_err(|error| HandlerError::new("ModelLoadError", error.to_string()))?;
        // The Rust SDK gives init no log callback; the host passes the handler's stderr on.
        eprintln!(
            "embed: loaded all-MiniLM-L6-v2 from {} in {} ms: {} parameters, {:.1} MB of weights, up to {} tokens a text",
            config.model_dir.display(),
            started.elapsed().as_millis(),
            model.parameters(),
            model.weight_bytes() as f64 / 1e6,
            model.max_tokens(),
        );
        Ok(Self {
            model,
            max_texts: config.max_texts,
        })
    }

    fn handle(&self, input: Input, job: &Job<'_>) -> Result<Output, HandlerError> {
        let texts = match (input.texts, input.text) {
            (Some(_), Some(_)) => return Err(value_error(EmbedError::Both)),
            (Some(texts), None) => texts,
            (None, Some(text)) => vec![text],
            (None, None) => return Err(value_error(EmbedError::NoText)),
        };
        if texts.len() > self.max_texts {
            return Err(value_error(EmbedError::TooManyTexts {
                count: texts.len(),
                max: self.max_texts,
            }));
        }
        let started = Instant::now();
        let (embeddings, tokens) = self.model.embed(&texts).map_err(|error| match error {
            EmbedError::Tokenize(_) | EmbedError::Compute(_) => {
                HandlerError::new("ModelError", error.to_string())
            }
            _ => value_error(error),
        })?;
        // The bench reads this line to set the handler's own time against the host's.
        job.log(
            LogLevel::Debug,
            &format!(
                "embedded {} texts ({tokens} tokens padded) in {} µs",
                texts.len(),
                started.elapsed().as_micros()
            ),
        );
        Ok(Output { embeddings })
    }
}

/// An input the handler refuses: RunPod's usual `ValueError`.
fn value_error(error: EmbedError) -> HandlerError {
    HandlerError::new("ValueError", error.to_string())
}

export_handler!(Embed);
