//! The deployment files as the tests read them: a small parser of nginx's configuration syntax
//! (docker/nginx.conf) and the Dockerfile's instructions. Shared by the nginx, Compose and
//! Dockerfile tests, which check the files against each other.

use super::external::read;

/// One nginx directive: `name args...;` or `name args... { block }`.
#[derive(Debug)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    pub block: Vec<Directive>,
}

impl Directive {
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Directive> + 'a {
        self.block.iter().filter(move |d| d.name == name)
    }

    pub fn one(&self, name: &str) -> &Directive {
        let found: Vec<&Directive> = self.block.iter().filter(|d| d.name == name).collect();
        assert_eq!(found.len(), 1, "exactly one `{name}` in `{}`", self.name);
        found[0]
    }

    /// The arguments of the one `name` directive, joined by spaces.
    pub fn value(&self, name: &str) -> String {
        self.one(name).args.join(" ")
    }

    pub fn location(&self, args: &[&str]) -> &Directive {
        self.all("location")
            .find(|l| l.args == args)
            .unwrap_or_else(|| panic!("no `location {}`", args.join(" ")))
    }

    /// This directive and every one nested in it.
    pub fn walk(&self) -> Vec<&Directive> {
        let mut out = vec![self];
        for d in &self.block {
            out.extend(d.walk());
        }
        out
    }
}

/// Parses nginx configuration syntax: words, quoted strings, `;`, `{`, `}` and `#` comments.
pub fn parse_nginx(text: &str) -> Directive {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            ';' | '{' | '}' => {
                tokens.push(c.to_string());
                chars.next();
            }
            '"' | '\'' => {
                chars.next();
                let mut s = String::from("\u{0}");
                while let Some(x) = chars.next() {
                    match x {
                        '\\' => s.push(chars.next().expect("escape")),
                        x if x == c => break,
                        x => s.push(x),
                    }
                }
                tokens.push(s);
            }
            _ => {
                let mut s = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_whitespace() || matches!(x, ';' | '{' | '}') {
                        break;
                    }
                    s.push(x);
                    chars.next();
                }
                tokens.push(s);
            }
        }
    }
    pub fn block(tokens: &[String], i: &mut usize) -> Vec<Directive> {
        let mut out = Vec::new();
        let mut words: Vec<String> = Vec::new();
        while *i < tokens.len() {
            let t = &tokens[*i];
            *i += 1;
            match t.as_str() {
                ";" | "{" => {
                    assert!(!words.is_empty(), "empty directive in nginx.conf");
                    let name = words.remove(0);
                    let inner = if t == "{" {
                        block(tokens, i)
                    } else {
                        Vec::new()
                    };
                    // Quoted words were marked with a leading NUL: drop the mark.
                    let args = words
                        .drain(..)
                        .map(|w| w.trim_start_matches('\u{0}').to_string())
                        .collect();
                    out.push(Directive {
                        name,
                        args,
                        block: inner,
                    });
                }
                "}" => return out,
                _ => words.push(t.clone()),
            }
        }
        assert!(words.is_empty(), "unterminated directive {words:?}");
        out
    }
    let mut i = 0;
    let root = block(&tokens, &mut i);
    Directive {
        name: "main".into(),
        args: Vec::new(),
        block: root,
    }
}

pub fn shipped_nginx() -> Directive {
    parse_nginx(&read("docker/nginx.conf"))
}

/// The Dockerfile's instructions, continuation lines joined and comments dropped: (KEYWORD, rest).
pub fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("docker/Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (k, v) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((k.to_ascii_uppercase(), v.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "Dockerfile ends in a continuation");
    out
}

/// The instructions of the last stage.
pub fn final_stage() -> Vec<(String, String)> {
    let all = dockerfile();
    let start = all.iter().rposition(|(k, _)| k == "FROM").expect("FROM");
    all[start..].to_vec()
}
