//! Chat templates: the model's own Jinja template (a GGUF's `tokenizer.chat_template`, or the `chat_template` of a
//! Hugging Face `tokenizer_config.json`) rendered with `minijinja`, with the Python string methods such templates
//! call (`minijinja-contrib`'s pycompat).

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};

use crate::error::{MorError, Result};
use crate::serve::api::Message;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile `source`; `bos_token` / `eos_token` are the strings the template sees under those names. Errors on a
    /// template syntax error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Hugging Face templates signal bad conversations (e.g. roles out of order) with raise_exception(msg).
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| MorError::Config(format!("chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages`, ending with the assistant's turn opener. Errors ([`MorError::Request`]) when the
    /// template refuses the conversation.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| MorError::Config(format!("chat template: {e}")))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| {
            let detail = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            MorError::Request(format!("the chat template refused the messages: {detail}"))
        })
    }
}

/// The chat template source stored beside a checkpoint: the `chat_template` of `dir/tokenizer_config.json` (a
/// string, or a list of `{name, template}` of which the one named `default` is taken). `Ok(None)` when there is
/// none.
pub fn template_beside_checkpoint(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| MorError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| MorError::Data(format!("{}: {e}", path.display())))?;
    Ok(match &v["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}
