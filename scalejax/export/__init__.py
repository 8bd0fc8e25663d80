"""Export to other frameworks: a decoder with its scales folded, as a Hugging Face
transformers checkpoint (`hf.export`) with its tokenizer (`tokenizer.save`)."""
