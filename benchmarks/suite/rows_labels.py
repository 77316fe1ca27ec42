"""Rows of the suite's label-code tasks (make_suite.py): support tickets in two queues, and
banking requests in twenty-two intent codes."""

from __future__ import annotations

import random

from rows_common import Row, unique, with_ids

# --- 1. two label codes -------------------------------------------------------------------------

BILLING = [
    "You charged my card twice for order {n}, please refund one payment.",
    "Can I get an invoice with our VAT number for the {thing} subscription?",
    "Why did the price of my {thing} plan go up this month?",
    "I want to change the credit card you use for my monthly payment.",
    "My discount code was not applied and I paid the full {n} euros.",
    "Please cancel my {thing} subscription and refund the unused months.",
    "I paid by bank transfer {when} but my account still says unpaid.",
    "Do you offer a cheaper yearly plan for the {thing}?",
    "The receipt for order {n} shows the wrong amount.",
    "How do I download all my invoices from {when}?",
]
TECHNICAL = [
    "The {thing} crashes every time I open the settings page.",
    "I never receive the password reset email, so I cannot log in to the {thing}.",
    "The {thing} has been very slow to load since {when}.",
    "My {device} will not connect to the wifi after the update.",
    "I get error 500 when I upload a file to the {thing}.",
    "Notifications from the {thing} stopped showing on my phone {when}.",
    "The export to PDF button in the {thing} does nothing.",
    "The {device} keeps disconnecting from Bluetooth.",
    "Since {when} the {thing} shows a blank white screen.",
    "Two-factor codes from the {thing} arrive too late and are rejected.",
]
THINGS = ["billing portal", "web shop", "mobile app", "dashboard", "booking system", "customer portal"]
DEVICES = ["printer", "smart speaker", "tablet", "router", "smart watch", "camera"]
WHEN_T = ["yesterday", "last week", "Monday", "this morning", "the last update"]


def ticket_rows(n: int = 60, seed: int = 101) -> list[Row]:
    def make(rng: random.Random) -> Row:
        label = "billing" if rng.random() < 0.5 else "technical"
        template = rng.choice(BILLING if label == "billing" else TECHNICAL)
        text = template.format(thing=rng.choice(THINGS), device=rng.choice(DEVICES), when=rng.choice(WHEN_T),
                               n=rng.randint(1000, 9999))
        return {"message": text, "queue": label}

    return with_ids("ticket", unique(random.Random(seed), n, make, "message"))


# --- 2. twenty-two label codes ------------------------------------------------------------------

INTENTS: dict[str, tuple[str, list[str]]] = {
    "card_lost": ("card lost or stolen", [
        "I can't find my {card} anywhere, I think I lost it {when}.",
        "My wallet with my {card} was stolen {when}.",
    ]),
    "card_declined": ("card refused at a payment", [
        "My {card} was declined at the supermarket {when}.",
        "Why does the shop keep refusing my {card}?",
    ]),
    "activate_card": ("turn on a new card", [
        "My new {card} arrived {when}, how do I start using it?",
        "How can I activate the {card} you sent me?",
    ]),
    "change_pin": ("change the PIN", [
        "I want to set a new PIN for my {card}.",
        "How do I change the PIN code of my {card}?",
    ]),
    "check_balance": ("how much money is in an account", [
        "How much money is left in my {account}?",
        "Can you tell me the balance of my {account}?",
    ]),
    "transfer_money": ("send money to another account", [
        "I need to send {amount} from my {account} to my brother.",
        "How do I move {amount} to someone else's account?",
    ]),
    "open_account": ("open a new account", [
        "I would like to open a {account} with you.",
        "What do I need to open a new {account}?",
    ]),
    "close_account": ("close an account", [
        "Please close my {account}, I no longer need it.",
        "How do I shut down my {account} for good?",
    ]),
    "loan_info": ("personal loan questions", [
        "Can I borrow {amount} for a new car?",
        "What are the conditions for a personal loan of {amount}?",
    ]),
    "mortgage_rate": ("mortgage interest rates", [
        "What is your current interest rate for a home mortgage?",
        "How high is the mortgage rate for a house bought {when}?",
    ]),
    "exchange_rate": ("currency exchange rates", [
        "How many dollars do I get for {amount} today?",
        "What is the exchange rate from euros to yen?",
    ]),
    "atm_location": ("where to find a cash machine", [
        "Where is the nearest cash machine to the train station?",
        "Is there an ATM near the city centre where I can withdraw {amount}?",
    ]),
    "branch_hours": ("when a branch is open", [
        "What time does your branch on Main Street open {when}?",
        "Is the local branch open on Saturday afternoons?",
    ]),
    "update_address": ("change the postal address", [
        "I moved house {when}, please update my address.",
        "How do I change the home address on my {account}?",
    ]),
    "report_fraud": ("unknown payments, fraud", [
        "There are payments on my {account} that I never made.",
        "Someone used my {card} to buy things online {when}, it was not me.",
    ]),
    "dispute_charge": ("contest a charge from a shop", [
        "The hotel charged me {amount} for a room I cancelled, I want my money back.",
        "A shop billed me {amount} twice for one purchase, can you reverse it?",
    ]),
    "order_checkbook": ("order cheques", [
        "Please send me a new book of cheques for my {account}.",
        "I ran out of cheques, how do I order more?",
    ]),
    "increase_limit": ("raise a spending limit", [
        "Can you raise the spending limit on my {card} to {amount}?",
        "I need a higher daily limit on my {card} for a trip.",
    ]),
    "pay_bill": ("pay a bill", [
        "How do I pay my electricity bill of {amount} from my {account}?",
        "I want to pay my phone bill through the app {when}.",
    ]),
    "direct_deposit": ("salary paid into the account", [
        "How do I get my salary paid straight into my {account}?",
        "My employer needs the details to deposit my wages directly.",
    ]),
    "statement_request": ("a copy of a statement", [
        "Please send me the statement of my {account} for last month.",
        "Where can I download my account statements from {when}?",
    ]),
    "travel_notice": ("tell the bank about a trip abroad", [
        "I am going to Japan {when}, please note it so my {card} works there.",
        "I will travel abroad next month and want to use my {card} there.",
    ]),
}
CARDS = ["debit card", "credit card", "bank card"]
ACCOUNTS = ["savings account", "current account", "joint account", "business account"]
AMOUNTS = ["200 euros", "1,500 euros", "50 dollars", "3,000 pounds", "800 euros"]
WHEN = ["yesterday", "last week", "this morning", "on Friday", "two days ago"]


def intent_rows(n: int = 80, seed: int = 202) -> list[Row]:
    codes = list(INTENTS)

    def make(rng: random.Random) -> Row:
        code = rng.choice(codes)
        text = rng.choice(INTENTS[code][1]).format(card=rng.choice(CARDS), account=rng.choice(ACCOUNTS),
                                                   amount=rng.choice(AMOUNTS), when=rng.choice(WHEN))
        return {"text": text, "intent": code}

    rng = random.Random(seed)
    # Every code at least twice, then random ones.
    rows: list[Row] = []
    seen: set[str] = set()
    for code in codes * 2:
        while True:
            text = rng.choice(INTENTS[code][1]).format(card=rng.choice(CARDS), account=rng.choice(ACCOUNTS),
                                                       amount=rng.choice(AMOUNTS), when=rng.choice(WHEN))
            if text not in seen:
                break
        seen.add(text)
        rows.append({"text": text, "intent": code})
    while len(rows) < n:
        row = make(rng)
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    rng.shuffle(rows)
    return with_ids("intent", rows)


def intent_code_list() -> str:
    return "\n".join(f"{code}: {gloss}" for code, (gloss, _) in INTENTS.items())
