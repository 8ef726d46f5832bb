"""Role drift of a simulated user, judged by the turn's structure rather than its topic.

A user asks, asks for something, reacts or gives context; an assistant explains, delivers and offers more.
A "user" turn drifted when it speaks as the assistant (role labels, "as an AI", service formulas such as
"I hope this helps" or "Let me know if ..."), talks about its own earlier answer ("in my previous
response"), answers its own question, or delivers an answer (a list of steps, a composed letter or poem,
an explanation) with no sign of a user in it: no question, no request, no first-person need or
circumstance, no push-back on what the assistant said. Measured on tests/data/role_drift_turns.jsonl.
"""

from __future__ import annotations

import re

_FLAGS = re.IGNORECASE | re.MULTILINE
# The turn is written as (or contains) a labelled transcript.
_ROLE_LABEL = re.compile(r"^\s*(?:assistant|ai|ai assistant|chatbot|bot|gpt|system)\s*:|"
                         r"^\s*(?:user|human)\s*:.*\n(?:.*\n)*?\s*(?:assistant|ai)\s*:", _FLAGS)
_AI_SELF = re.compile(r"\bas an? (?:ai|artificial intelligence|language model|large language model|virtual assistant)"
                      r"|\bi(?: am|'m) (?:just |only )?an? (?:ai|language model|chatbot|virtual assistant)\b"
                      r"|\bmy (?:training data|knowledge cutoff)\b", _FLAGS)
# What an assistant says around an answer: offers, closings, apologies, praise of the question.
_SERVICE = re.compile(
    r"\b(?:i )?hope (?:this|that|it|my)(?: \w+)? (?:helps|helped|clarifies|answers|was helpful|is helpful)"
    r"|\blet me know if (?!i\b|we\b)|\bfeel free to\b"
    r"|\b(?:is there )?anything else (?:i|we) can (?:help|assist|do)\b"
    r"|\b(?:happy|glad) (?:to|i could|i can) (?:help|assist)\b|\bi(?:'d| would) be (?:happy|glad|delighted) to\b"
    r"|^\s*you(?:'re| are) (?:very |most )?welcome\b|^\s*(?:great|good|excellent|interesting) question\b"
    r"|\bi apologi[sz]e\b|\bmy apologies\b|\bsorry for (?:the|any) confusion\b"
    r"|\bthank(?:s| you) for (?:contacting|reaching out|your patience|your question)\b"
    r"|\bgood luck with your\b", _FLAGS)
# The speaker treats the earlier answer as its own.
_OWN_ANSWER = re.compile(
    r"\bmy (?:previous|earlier|last|initial|original|above|first) (?:answer|response|reply|explanation|message|"
    r"suggestion|solution|example|recommendation)s?\b"
    r"|\bi (?:gave|provided|suggested|recommended|showed) (?:you|above|earlier)\b"
    r"|^\s*you(?:'re| are) right to (?:question|point|ask)\b", _FLAGS)
_OPENER = re.compile(r"^\s*(?:sure|certainly|of course|absolutely|definitely)\b[!,.:]?", re.IGNORECASE)
_DELIVERY = re.compile(r"^\s*(?:(?:sure|certainly|of course|absolutely|ok(?:ay)?)\b[!,.:]?\s*)?"
                       r"here(?: is|'s| are)\b([^:\n]*)", re.IGNORECASE)
_SALUTATION = re.compile(r"^\s*(?:dear|hi|hello)\s+[A-Z][\w .]*,\s*$|^\s*(?i:dear)\s+\w+", re.MULTILINE)
_STEPS = re.compile(r"(?:^|\s)(?:1[.)]\s.+(?:^|\s)2[.)]\s|(?:step|day|part)\s*\d+\s*:)", re.IGNORECASE | re.DOTALL)
_ANSWER_MARK = re.compile(r"\bthe (?:correct |final )?answer is\b|=\s*-?\d", re.IGNORECASE)
# A question answered in the next breath ("Why is the sky blue? Because ...").
_SELF_ANSWER = re.compile(r"\?\s+(?:because\b|it(?:'s| is| was)\b|the answer is\b|that(?:'s| is) because\b|"
                          r"(?:yes|no)\b[,.!]\s+\w+)(.*)",
                          re.IGNORECASE | re.DOTALL)

# -- signs of a user --------------------------------------------------------------------------------------------
_ASSISTANT_FIRST_PERSON = re.compile(  # first person that belongs to an assistant's voice, not a user's
    r"\bi(?:'d| would)? (?:recommend|suggest|advise)\b|\bi(?:'m| am) sorry to hear\b|\bi hope\b|\blet me\b"
    r"|\bi(?:'m| am) not an? (?:lawyer|doctor|physician|medical professional|financial advis[oe]r|"
    r"tax professional|therapist|expert)\b|\bi can (?:help|assist|explain|show)\b", re.IGNORECASE)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|me|my|mine|myself|we|we're|we've|our|us)\b", re.IGNORECASE)
_NUMERAL_I = re.compile(r"\b([A-Z][a-z]+) I\b(?=\s*[,.;:)]|\s*$)")  # "Theodosius I," "World War I."
_REQUEST = re.compile(
    r"\b(?:can|could|would|will) you\b|\bplease\b|\bi(?:'d| would) (?:like|love|prefer|rather)\b|\bi (?:want|need)\b"
    r"|\bhelp me\b|\blet's\b|\blet us\b|\bi wonder\b|\bi'm curious\b"
    r"|\bif (?:that|it) (?:helps|matters)\b|\bby the way\b|\bjust so you know\b|\bfyi\b", re.IGNORECASE)
_PUSHBACK = re.compile(
    r"^\s*(?:that(?:'s| is)|this is|it(?:'s| is)) (?:not (?:right|correct|what)|wrong|incorrect)\b"
    r"|\byou(?:'re| are) wrong\b|\byou (?:said|forgot|missed|mentioned|skipped|meant)\b"
    r"|\byour (?:answer|reply|response|explanation|version|code|example|list|suggestion|solution|recipe|plan)\b"
    r"|\b(?:still|again) (?:fails|failing|crashes|breaks|errors?|get|gives|doesn'?t|does not)\b"
    r"|\b(?:doesn'?t|didn'?t|does not|did not|won'?t) work\b", re.IGNORECASE)
# A clause that opens by asking for something: a request verb, or any verb aimed at "it/this/me" ("Tone it
# down", "Quiz me"), or a follow-on marker ("Now ...", "Next, ...").
_DISCOURSE = re.compile(r"^(?:(?:ok(?:ay)?|alright|right|fine|great|perfect|cool|thanks|thank you|got it|"
                        r"i see|hmm+|so|and|also|well|wow|interesting|sounds good|makes sense|yes|no)\b[\s,.!]*)+",
                        re.IGNORECASE)
_ASK_VERB = re.compile(
    r"^(?:now|next|then|and now|also|finally|lastly)\b|^\w+ (?:me|us)\b"
    r"|^(?!(?:if|when|so|but|because|as|once|and|or|is|was|does|did|let)\b)\w+ (?:it|this|that|these|those|them)\b"
    r"(?=(?:\W+\w+){0,6}\W*$)"
    r"|^(?:explain|write|rewrite|make|give|list|show|tell|describe|summari[sz]e|translate|compare|suggest|"
    r"recommend|convert|draft|create|generate|check|fix|continue|simplify|shorten|expand|elaborate|calculate|"
    r"compute|solve|spell|define|plan|find|name|repeat|proofread|edit|rephrase|reword|polish|improve|quiz|"
    r"teach|help|go ahead|try again|do)\b", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?:])\s+|\n+")
_LONG = 10  # words: a turn this long with no sign of a user is an answer, not a reaction


def _asks(text: str) -> bool:
    return any(_ASK_VERB.match(_DISCOURSE.sub("", s.strip())) for s in _SENTENCES.split(text) if s.strip())


def user_signs(text: str) -> list[str]:
    """Why a turn reads as a user's: a question, a request, first-person context, push-back."""
    signs = []
    if "?" in text:
        signs.append("question")
    if _REQUEST.search(text) or _asks(text):
        signs.append("request")
    if _FIRST_PERSON.search(_NUMERAL_I.sub(r"\1", _ASSISTANT_FIRST_PERSON.sub(" ", text))):
        signs.append("first_person")
    if _PUSHBACK.search(text):
        signs.append("push_back")
    return signs


def role_drift(turn: str) -> str | None:
    """Why a simulated user turn reads as the assistant's (a short reason), or None if it reads as a user's."""
    text = turn.strip()
    words = len(text.split())
    if _ROLE_LABEL.search(text):
        return "role_label"
    if _AI_SELF.search(text):
        return "speaks_as_ai"
    if _SERVICE.search(text):
        return "assistant_formula"
    if _OWN_ANSWER.search(text):
        return "refers_to_own_answer"
    if (m := _SELF_ANSWER.search(text)) and not _FIRST_PERSON.search(m.group(1)):
        return "answers_own_question"
    if _OPENER.match(text) and words >= 12 and "?" not in text:
        return "delivers_answer"
    if (m := _DELIVERY.match(text)) and not _FIRST_PERSON.search(m.group(1)):
        return "delivers_answer"
    signs = user_signs(text)
    if _SALUTATION.search(text) and not {"question", "request"} & set(signs):
        return "delivers_answer"
    if signs:
        return None
    if _STEPS.search(text) or _ANSWER_MARK.search(text) or text.count("\n") >= 2:
        return "answers_instead_of_asking"
    return "answers_instead_of_asking" if words >= _LONG else None
