//! Errors on one line: the message of an error and of each of its sources, joined by `": "`, for
//! logs, API answers and the command line (each error's own message never repeats its source).

use std::error::Error;

/// `e` and its chain of sources on one line: `outer: middle: root cause`.
pub fn error_chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    #[test]
    fn every_source_follows_on_one_line() {
        let e = Layer(
            "cannot add",
            Some(Box::new(Layer(
                "busy",
                Some(Box::new(Layer("EBUSY", None))),
            ))),
        );

        assert_eq!(error_chain(&e), "cannot add: busy: EBUSY");
    }

    #[test]
    fn error_without_source_is_its_message() {
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
