#!/usr/bin/env python3
"""Writes the demo's bank-adviser data (deterministic; the outputs are committed):

- chat.jsonl: customer-service conversations (OpenAI messages JSONL, `labels.category`), in
  English and Chinese, with the dirt a real export has: exact and near duplicates, PII
  (emails, phone numbers, resident ID and bank card numbers), non-compliant promises
  ("保本", "无风险", "guaranteed return"), control characters and mojibake, full-width text,
  empty and role-broken conversations, a language outside the allow-list and two lines that
  are not JSON.
- corpus.txt: plain paragraphs about the same products, for the from-scratch base model.

Run: python3 examples/bank-adviser/generate.py
"""
import json
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent

# category, [(english questions, english answer), (chinese questions, chinese answer)]
TOPICS = [
    ("deposit",
     ["What is the rate on a one-year fixed deposit?", "How much interest does a 1-year time deposit pay?",
      "Tell me the one-year fixed deposit rate."],
     "A one-year fixed deposit pays 1.65% a year. Rates change, so check the rate sheet on the day you open it.",
     ["一年期定期存款利率是多少？", "存一年定期能有多少利息？", "请问一年定存的利率？"],
     "一年期定期存款年利率为1.65%。利率会调整，请以办理当天的牌价为准。"),
    ("fund",
     ["Is a money market fund safe?", "Can I lose money in a money market fund?",
      "How risky are money market funds?"],
     "A money market fund is low risk but not guaranteed: its value can fall. Read the prospectus and match it to your risk level.",
     ["货币基金安全吗？", "买货币基金会亏钱吗？", "货币基金的风险大吗？"],
     "货币基金风险较低，但不承诺收益，净值可能下跌。请阅读基金合同，并结合您的风险测评结果选择。"),
    ("loan",
     ["How do I apply for a mortgage?", "What do I need for a home loan?",
      "Which documents does a mortgage application need?"],
     "Bring your ID, proof of income and the purchase contract to a branch. We assess your credit and answer within five working days.",
     ["怎么申请房贷？", "办理住房贷款需要什么材料？", "申请按揭要带哪些资料？"],
     "请携带身份证、收入证明和购房合同到网点办理，我们审核征信后五个工作日内答复。"),
    ("card",
     ["I lost my debit card, what should I do?", "My bank card was stolen. What now?",
      "How do I report a lost card?"],
     "Call 95588 at once to freeze the card, then bring your ID to any branch for a new one.",
     ["银行卡丢了怎么办？", "我的借记卡被偷了，该怎么处理？", "卡丢了怎么挂失？"],
     "请立即拨打95588冻结挂失，再携带身份证到任一网点补办新卡。"),
    ("security",
     ["Someone on the phone asked for my SMS code. Should I give it?",
      "A caller says he is from the bank and wants my password.",
      "Is it fine to tell the bank my verification code?"],
     "Never share SMS codes or passwords. The bank never asks for them. Hang up and call the number on the back of your card.",
     ["有人打电话要我的短信验证码，可以给吗？", "自称银行客服的人要我的密码。", "可以把验证码告诉银行工作人员吗？"],
     "任何情况下都不要透露验证码和密码，银行不会索要。请挂断电话，拨打卡背面的官方号码核实。"),
    ("risk",
     ["Why do I need a risk assessment?", "What is the risk questionnaire for?",
      "Do I have to take the risk test before buying a fund?"],
     "Before selling investment products we must assess your risk tolerance, so we only recommend products that suit you.",
     ["为什么要做风险测评？", "风险评估问卷有什么用？", "买基金前必须做风险测评吗？"],
     "根据监管要求，销售投资产品前须评估您的风险承受能力，我们只推荐与之匹配的产品。"),
    ("compliance",
     ["Can you guarantee a 10% return?", "Will this product surely make money?",
      "Promise me I will not lose my principal."],
     "No. No investment product can promise returns or protect the principal unless it is a deposit. Past returns do not predict future ones.",
     ["能保证10%的收益吗？", "这个产品一定赚钱吗？", "你能承诺我不亏本金吗？"],
     "不能。除存款外，任何投资产品都不能承诺收益或本金安全，过往业绩不代表未来表现。"),
    ("fx",
     ["How much foreign currency can I buy each year?", "What is the yearly limit for buying dollars?"],
     "Each person can buy foreign currency worth up to 50,000 US dollars a year.",
     ["每年可以换多少外汇？", "个人购汇额度是多少？"],
     "每人每年的购汇便利化额度为等值5万美元。"),
    # A rare class: few records, named by the coverage report.
    ("inheritance",
     ["How do I claim a late relative's deposits?"],
     "Bring the death certificate, proof of kinship and a notarised inheritance document to the branch that holds the account.",
     ["亲人去世后存款怎么继承？"],
     "请携带死亡证明、亲属关系证明和继承公证书，到开户网点办理。"),
]


def chat(q, a, category, lang):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "labels": {"category": category, "lang": lang}}


def luhn_complete(prefix):
    digits = [int(d) for d in prefix]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return prefix + str((10 - total % 10) % 10)


def resident_id(body17):
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body17, weights)) % 11]
    return body17 + check


def main():
    rng = random.Random(7)
    records = []
    for category, en_qs, en_a, zh_qs, zh_a in TOPICS:
        for q in en_qs:
            records.append(chat(q, en_a, category, "en"))
        for q in zh_qs:
            records.append(chat(q, zh_a, category, "zh"))
    rng.shuffle(records)

    card = luhn_complete("622202020011223344")
    pid = resident_id("11010119900307451")
    dirty = [
        # Exact duplicates of clean records.
        records[0], records[3], records[5],
        # A near duplicate: extra spaces and a different final punctuation.
        chat("What is the rate on a one-year fixed deposit ?",
             "A one-year fixed deposit pays 1.65% a year. Rates change, so check the rate sheet on the day you open it!",
             "deposit", "en"),
        # PII: email, phone, resident ID, bank card (redacted to placeholders).
        chat(f"My card {card} was swallowed by the ATM, email me at li.na@example.com or call 13812345678.",
             "Call 95588 at once to freeze the card, then bring your ID to any branch for a new one.", "card", "en"),
        chat(f"我的身份证号是{pid}，手机13900001111，卡丢了怎么办？",
             "请立即拨打95588冻结挂失，再携带身份证到任一网点补办新卡。", "card", "zh"),
        # Non-compliant promises (dropped by the blocklist).
        chat("这个理财产品怎么样？", "这款产品保本保息，无风险，年化8%。", "fund", "zh"),
        chat("Is this bond fund a good idea?", "Yes, it is a guaranteed return with no risk at all.", "fund", "en"),
        # Control characters, mojibake and full-width text (cleaned).
        chat("How do I reset my online\u0007 banking password?\u200b",
             "Open the app, tap Forgot password and verify with your ID and the SMS code sent to your registered phone. Donâ€™t share the code.",
             "security", "en"),
        chat("ＡＴＭ取款每天限额多少？", "ＡＴＭ每日取现限额为２万元，每笔不超过５０００元。", "card", "zh"),
        # Empty and role-broken conversations (dropped).
        {"messages": []},
        {"messages": [{"role": "assistant", "content": "Hello, how can I help?"}]},
        # Outside the language allow-list (dropped).
        chat("Quel est le taux du livret A ?", "Le taux du livret A est fixé par l'État.", "deposit", "fr"),
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records + dirty]
    # Two lines that are not JSON: reported with their line numbers, the rest still processed.
    lines.insert(12, '{"messages": [{"role": "user", "content": "unterminated')
    lines.insert(30, "this line is not json")
    (HERE / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    paragraphs = []
    for category, en_qs, en_a, zh_qs, zh_a in TOPICS:
        paragraphs.append(f"{en_qs[0]} {en_a}")
        paragraphs.append(f"{zh_qs[0]}{zh_a}")
    extra = [
        "A bank adviser explains products plainly, names their risks and never promises returns.",
        "银行理财顾问应当如实介绍产品，充分揭示风险，不得承诺收益。",
        "Deposits are protected by deposit insurance up to 500,000 yuan per person per bank.",
        "存款保险对同一存款人在同一家银行的存款实行最高50万元的偿付限额。",
        "Funds, bonds and wealth management products can lose value; deposits earn a fixed rate.",
        "基金、债券和理财产品的价值可能下跌，定期存款按约定利率计息。",
    ]
    paragraphs += extra
    rng.shuffle(paragraphs)
    (HERE / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
