"""Results of the sfrnn_ptb_* tasks: a document's log-likelihood and its number of words, aggregated by lm-eval's
`weighted_perplexity` into exp(-total log-likelihood / total words), the word perplexity its rolling tasks report."""


def process_results(doc, results):
    (loglikelihood, _is_greedy), = results
    return {"word_perplexity": (loglikelihood, len(doc["text"].split()))}
