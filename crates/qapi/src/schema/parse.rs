//! Reads ferrite's schema language (see the parent module) into a [`Schema`].

use super::{Builtin, Command, EnumValue, Event, Member, Schema, TypeDef, TypeRef};
use indexmap::IndexMap;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Punct(char),
    Arrow,
    Feature(String),
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, String> {
    let mut out = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let mut chars = line.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let lineno = lineno + 1;
            if c.is_whitespace() || c == ',' {
                continue;
            }
            if c == '-' && line[i + 1..].starts_with('>') {
                chars.next();
                out.push((Tok::Arrow, lineno));
            } else if matches!(c, '{' | '}' | '[' | ']' | ':' | '?' | '|') {
                out.push((Tok::Punct(c), lineno));
            } else if c == '@' || is_word_char(c) {
                let mut word = String::new();
                if c != '@' {
                    word.push(c);
                }
                while let Some(&(_, n)) = chars.peek() {
                    if !is_word_char(n) {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                out.push((
                    if c == '@' {
                        Tok::Feature(word)
                    } else {
                        Tok::Word(word)
                    },
                    lineno,
                ));
            } else {
                return Err(format!("line {lineno}: unexpected '{c}'"));
            }
        }
    }
    Ok(out)
}

struct Parser<'s> {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    schema: &'s mut Schema,
}

type R<T> = Result<T, String>;

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }

    fn line(&self) -> usize {
        self.toks
            .get(self.pos.min(self.toks.len().saturating_sub(1)))
            .map_or(0, |t| t.1)
    }

    fn err<T>(&self, msg: impl std::fmt::Display) -> R<T> {
        Err(format!("line {}: {msg}", self.line()))
    }

    fn word(&mut self) -> R<String> {
        match self.toks.get(self.pos) {
            Some((Tok::Word(w), _)) => {
                self.pos += 1;
                Ok(w.clone())
            }
            other => self.err(format!("expected a name, found {other:?}")),
        }
    }

    fn punct(&mut self, c: char) -> R<()> {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            Ok(())
        } else {
            self.err(format!("expected '{c}'"))
        }
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn keyword(&mut self, k: &str) -> bool {
        self.eat(&Tok::Word(k.to_owned()))
    }

    fn features(&mut self) -> Vec<String> {
        let mut f = Vec::new();
        while let Some(Tok::Feature(name)) = self.peek() {
            f.push(name.clone());
            self.pos += 1;
        }
        f
    }

    fn type_ref(&mut self) -> R<TypeRef> {
        if self.eat(&Tok::Punct('[')) {
            let inner = self.type_ref()?;
            self.punct(']')?;
            return Ok(TypeRef::Array(Box::new(inner)));
        }
        let name = self.word()?;
        Ok(match Builtin::from_name(&name) {
            Some(b) => TypeRef::Builtin(b),
            None => TypeRef::Named(name),
        })
    }

    /// `{ name[?]: type @feature ... }`
    fn members(&mut self) -> R<Vec<Member>> {
        self.punct('{')?;
        let mut members: Vec<Member> = Vec::new();
        while !self.eat(&Tok::Punct('}')) {
            let name = self.word()?;
            let optional = self.eat(&Tok::Punct('?'));
            self.punct(':')?;
            let ty = self.type_ref()?;
            let features = self.features();
            if members.iter().any(|m| m.name == name) {
                return self.err(format!("member '{name}' is declared twice"));
            }
            members.push(Member {
                name,
                ty,
                optional,
                features,
            });
        }
        Ok(members)
    }

    /// A struct given by name (its members copied) or inline; inline ones are registered
    /// under `anon_name` so introspection can refer to them.
    fn struct_ref_or_inline(&mut self, anon_name: String) -> R<String> {
        if self.peek() == Some(&Tok::Punct('{')) {
            let members = self.members()?;
            self.schema
                .add_type(anon_name.clone(), TypeDef::Struct(members))?;
            Ok(anon_name)
        } else {
            self.word()
        }
    }

    /// The argument or data struct of a command or event, if one follows.
    fn optional_struct(&mut self, anon_name: String) -> R<Option<String>> {
        match self.peek() {
            Some(Tok::Punct('{')) => self.struct_ref_or_inline(anon_name).map(Some),
            Some(Tok::Word(w)) if !is_decl_keyword(w) => self.word().map(Some),
            _ => Ok(None),
        }
    }

    fn base_members(&self, base: &str) -> R<Vec<Member>> {
        match self.schema.types.get(base) {
            Some(TypeDef::Struct(m)) => Ok(m.clone()),
            _ => self.err(format!("base '{base}' is not a struct declared earlier")),
        }
    }

    fn decl(&mut self) -> R<()> {
        let kind = self.word()?;
        match kind.as_str() {
            "enum" => {
                let name = self.word()?;
                self.punct('{')?;
                let mut values = Vec::new();
                while !self.eat(&Tok::Punct('}')) {
                    let v = self.word()?;
                    values.push(EnumValue {
                        name: v,
                        features: self.features(),
                    });
                }
                self.schema.add_type(name, TypeDef::Enum(values))
            }
            "struct" => {
                let name = self.word()?;
                let mut members = if self.keyword("base") {
                    let base = self.word()?;
                    self.base_members(&base)?
                } else {
                    Vec::new()
                };
                members.extend(self.members()?);
                self.schema.add_type(name, TypeDef::Struct(members))
            }
            "union" => {
                let name = self.word()?;
                if !self.keyword("base") {
                    return self.err("a union needs 'base'");
                }
                let base_name = self.struct_ref_or_inline(format!("q_obj_{name}-base"))?;
                let base = self.base_members(&base_name)?;
                if !self.keyword("tag") {
                    return self.err("a union needs 'tag'");
                }
                let tag = self.word()?;
                self.punct('{')?;
                let mut cases = IndexMap::new();
                while !self.eat(&Tok::Punct('}')) {
                    let case = self.word()?;
                    self.punct(':')?;
                    let ty = self.struct_ref_or_inline(format!("q_obj_{name}-{case}"))?;
                    cases.insert(case, ty);
                }
                self.schema
                    .add_type(name, TypeDef::Union { base, tag, cases })
            }
            "alternate" => {
                let name = self.word()?;
                self.punct('{')?;
                let mut members = vec![self.type_ref()?];
                while self.eat(&Tok::Punct('|')) {
                    members.push(self.type_ref()?);
                }
                self.punct('}')?;
                self.schema.add_type(name, TypeDef::Alternate(members))
            }
            "command" => {
                let name = self.word()?;
                let args = self.optional_struct(format!("q_obj_{name}-arg"))?;
                let ret = if self.eat(&Tok::Arrow) {
                    Some(self.type_ref()?)
                } else {
                    None
                };
                let mut features = self.features();
                let allow_oob = features.iter().any(|f| f == "allow-oob");
                let open_args = features.iter().any(|f| f == "open-args");
                features.retain(|f| f != "allow-oob" && f != "open-args");
                if self.schema.commands.contains_key(&name) {
                    return self.err(format!("command '{name}' is declared twice"));
                }
                self.schema.commands.insert(
                    name.clone(),
                    Command {
                        name,
                        args,
                        ret,
                        features,
                        allow_oob,
                        open_args,
                    },
                );
                Ok(())
            }
            "event" => {
                let name = self.word()?;
                let data = self.optional_struct(format!("q_obj_{name}-arg"))?;
                let features = self.features();
                if self.schema.events.contains_key(&name) {
                    return self.err(format!("event '{name}' is declared twice"));
                }
                self.schema.events.insert(
                    name.clone(),
                    Event {
                        name,
                        data,
                        features,
                    },
                );
                Ok(())
            }
            other => self.err(format!("unknown declaration '{other}'")),
        }
    }
}

fn is_decl_keyword(w: &str) -> bool {
    matches!(
        w,
        "enum" | "struct" | "union" | "alternate" | "command" | "event"
    )
}

/// Adds the declarations in `text` to `schema`.
pub(super) fn parse_into(schema: &mut Schema, text: &str) -> Result<(), String> {
    let toks = tokenize(text)?;
    let mut p = Parser {
        toks,
        pos: 0,
        schema,
    };
    while p.pos < p.toks.len() {
        p.decl()?;
    }
    Ok(())
}
