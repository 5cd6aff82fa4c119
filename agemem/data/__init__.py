"""HotpotQA loading, episode scripts, distractor synthesis."""
