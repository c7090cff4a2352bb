"""`edgellm serve`: OpenAI- and Ollama-compatible HTTP APIs over the model manager and the scheduler.

`catalog.py` names the models a request may ask for; `driver.py` is the llama thread: it loads models
through the manager and steps each model's scheduler while any request is active; `openai_api.py` and
`ollama_api.py` turn HTTP requests into jobs and records into responses; `app.py` puts them together.
"""
